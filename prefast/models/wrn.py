"""Pre-activation wide ResNet (Zagoruyko & Komodakis) for CIFAR-sized inputs.

Units: ``conv1`` then every basic block (``block1.1`` ... ``block3.n``); the head is
BN-ReLU-global average pool-Linear.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from prefast.models.base import UnitModel, reference_init_
from prefast.models.densenet import preact_head
from prefast.models.registry import ModelError, check_positive_int, register_model

logger = logging.getLogger(__name__)

_NAME = "wrn"


class PreActBlock(nn.Module):
    """BN-ReLU-Conv3x3(stride)-BN-ReLU-Conv3x3 plus a shortcut.

    When the shape changes the shortcut is a 1x1 strided conv applied to the
    pre-activated input, as in the reference WRN code; otherwise it is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(
                in_channels, out_channels, kernel_size=1, stride=stride, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        a = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(a))))
        skip = x if self.shortcut is None else self.shortcut(a)
        return out + skip


@register_model(_NAME)
def wrn(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = 16,
    widen: int = 4,
) -> UnitModel:
    """WRN-depth-widen: three groups of ``n = (depth - 4) / 6`` blocks.

    Group widths are ``16 * widen``, ``32 * widen``, ``64 * widen``; strides 1, 2, 2.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        image_size: input height = width.
        depth: ``6n + 4`` with n >= 1 (10, 16, 22, 28, 40, ...).
        widen: width multiplier k.
    """
    check_positive_int(_NAME, "num_classes", num_classes)
    check_positive_int(_NAME, "in_channels", in_channels)
    check_positive_int(_NAME, "image_size", image_size)
    check_positive_int(_NAME, "widen", widen)
    check_positive_int(_NAME, "depth", depth, minimum=10)
    if (depth - 4) % 6 != 0:
        allowed = ", ".join(str(6 * n + 4) for n in range(1, 7))
        raise ModelError(
            f"{_NAME}: depth must be 6n + 4 with n >= 1, e.g. {allowed}, ...; got {depth}"
        )
    n = (depth - 4) // 6

    units: list[nn.Module] = [
        nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)  # (16, H, W)
    ]
    names = ["conv1"]
    transition_after = [0]
    channels = 16
    for group, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        out = width * widen
        for b in range(1, n + 1):
            units.append(PreActBlock(channels, out, stride if b == 1 else 1))
            names.append(f"block{group}.{b}")
            channels = out
        transition_after.append(len(units) - 1)  # end of group: (out, H / s, W / s)
    head = preact_head(channels, num_classes)

    config = {
        "name": _NAME,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "depth": depth,
        "widen": widen,
    }
    model = UnitModel(units, head, names, transition_after=transition_after, config=config)
    reference_init_(model)
    return model


__all__ = ["PreActBlock", "wrn"]
