"""DenseNet-BC for CIFAR-sized inputs, split into freezable units.

Units in order: ``conv1``, the layers of dense block 1 (``dense1.1`` ...), ``trans1``, the
layers of block 2, ``trans2``, the layers of block 3. The head (BN-ReLU-pool-Linear) is
separate. For depth 76, growth 12 that is 39 units: conv1 = 0, dense1 = 1..12,
trans1 = 13, dense2 = 14..25, trans2 = 26, dense3 = 27..38.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from prefast.models.base import UnitModel, reference_init_
from prefast.models.registry import ModelError, check_positive_int, register_model

logger = logging.getLogger(__name__)

_NAME = "densenet_bc"


class DenseLayer(nn.Module):
    """One dense layer; its ``growth`` new channels are concatenated to the input.

    Bottleneck: BN-ReLU-Conv1x1(4 * growth)-BN-ReLU-Conv3x3(growth); plain: BN-ReLU-Conv3x3.
    """

    def __init__(self, in_channels: int, growth: int, bottleneck: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if bottleneck:
            inner = 4 * growth
            layers += [
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(in_channels, inner, kernel_size=1, bias=False),
            ]
            in_channels = inner
        layers += [
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth, kernel_size=3, padding=1, bias=False),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C + growth, H, W); the first BN's ReLU is inplace on a BN
        # output, never on x itself, so x survives for the concatenation.
        return torch.cat([x, self.body(x)], dim=1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1(out_channels)-AvgPool2: halves height and width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.AvgPool2d(kernel_size=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H // 2, W // 2)
        out: torch.Tensor = self.body(x)
        return out


def preact_head(channels: int, num_classes: int) -> nn.Sequential:
    """BN-ReLU-global average pool-Linear: (B, C, H, W) -> (B, num_classes)."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


@register_model(_NAME)
def densenet_bc(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = 76,
    growth: int = 12,
    reduction: float = 0.5,
    bottleneck: bool = True,
) -> UnitModel:
    """DenseNet-BC (Huang et al.) for CIFAR-sized inputs, three dense blocks.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        image_size: input height = width; at least 4 (two transitions halve it).
        depth: total depth; ``6n + 4`` with bottleneck (n layers per block), else ``3n + 4``.
        growth: channels each dense layer adds (k).
        reduction: compression of the transitions, in (0, 1]; out = floor(reduction * C).
        bottleneck: use the 1x1 bottleneck conv in each dense layer (the "B" of BC).
    """
    check_positive_int(_NAME, "num_classes", num_classes)
    check_positive_int(_NAME, "in_channels", in_channels)
    check_positive_int(_NAME, "image_size", image_size, minimum=4)
    check_positive_int(_NAME, "growth", growth)
    if not isinstance(bottleneck, bool):
        raise ModelError(f"{_NAME}: bottleneck must be True or False, got {bottleneck!r}")
    if (
        isinstance(reduction, bool)
        or not isinstance(reduction, int | float)
        or not 0 < reduction <= 1
    ):
        raise ModelError(f"{_NAME}: reduction must be a number in (0, 1], got {reduction!r}")
    per_layer = 6 if bottleneck else 3
    form = f"{per_layer}n + 4 with n >= 1 (bottleneck={bottleneck})"
    check_positive_int(_NAME, "depth", depth, minimum=per_layer + 4)
    if (depth - 4) % per_layer != 0:
        allowed = ", ".join(str(per_layer * n + 4) for n in range(1, 7))
        raise ModelError(f"{_NAME}: depth must be {form}, e.g. {allowed}, ...; got {depth}")
    n = (depth - 4) // per_layer

    units: list[nn.Module] = []
    names: list[str] = []
    transition_after: list[int] = []

    channels = 2 * growth
    units.append(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False))
    names.append("conv1")
    transition_after.append(0)  # conv1 output: (2k, H, W), cheap
    for block in (1, 2, 3):
        for layer in range(1, n + 1):
            units.append(DenseLayer(channels, growth, bottleneck))
            names.append(f"dense{block}.{layer}")
            channels += growth
        if block < 3:
            out = math.floor(reduction * channels)
            if out < 1:
                raise ModelError(
                    f"{_NAME}: reduction={reduction} leaves no channels after block {block}"
                )
            units.append(Transition(channels, out))
            names.append(f"trans{block}")
            transition_after.append(len(units) - 1)
            channels = out
    head = preact_head(channels, num_classes)

    config = {
        "name": _NAME,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "depth": depth,
        "growth": growth,
        "reduction": float(reduction),
        "bottleneck": bottleneck,
    }
    model = UnitModel(units, head, names, transition_after=transition_after, config=config)
    reference_init_(model)
    return model


__all__ = ["DenseLayer", "Transition", "densenet_bc", "preact_head"]
