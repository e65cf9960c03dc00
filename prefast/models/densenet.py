"""DenseNet-BC for CIFAR-sized inputs, split into freezable units.

Units in order: ``conv1``, the layers of dense block 1 (``dense1.1`` ...), ``trans1``, the
layers of block 2, ``trans2``, the layers of block 3. The head (BN-ReLU-pool-Linear) is
separate. For depth 76, growth 12 that is 39 units: conv1 = 0, dense1 = 1..12,
trans1 = 13, dense2 = 14..25, trans2 = 26, dense3 = 27..38.
"""

from __future__ import annotations

import math

from torch import nn

from prefast.errors import ModelError, check_bool, check_int, check_number
from prefast.models.base import UnitModel
from prefast.models.layers import DenseLayer, Transition, preact_head
from prefast.models.registry import build, check_common, register_model

_NAME = "densenet_bc"


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
    check_common(_NAME, num_classes, in_channels, image_size, min_size=4)
    check_int(f"{_NAME}: growth", growth, error=ModelError)
    check_bool(f"{_NAME}: bottleneck", bottleneck, error=ModelError)
    check_number(f"{_NAME}: reduction", reduction, 0, 1, low_open=True, error=ModelError)
    per_layer = 6 if bottleneck else 3
    form = f"{per_layer}n + 4 with n >= 1 (bottleneck={bottleneck})"
    check_int(f"{_NAME}: depth", depth, minimum=per_layer + 4, error=ModelError)
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

    return build(
        _NAME,
        units,
        names,
        head,
        transition_after,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        depth=depth,
        growth=growth,
        reduction=float(reduction),
        bottleneck=bottleneck,
    )


__all__ = ["densenet_bc"]
