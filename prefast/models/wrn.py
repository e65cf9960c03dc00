"""Pre-activation wide ResNet (Zagoruyko & Komodakis) for CIFAR-sized inputs.

Units: ``conv1`` then every basic block (``block1.1`` ... ``block3.n``); the head is
BN-ReLU-global average pool-Linear.
"""

from __future__ import annotations

from torch import nn

from prefast.errors import ModelError, check_int
from prefast.models.base import UnitModel
from prefast.models.layers import PreActBlock, preact_head
from prefast.models.registry import build, check_common, register_model

_NAME = "wrn"


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
    check_common(_NAME, num_classes, in_channels, image_size)
    check_int(f"{_NAME}: widen", widen, error=ModelError)
    check_int(f"{_NAME}: depth", depth, minimum=10, error=ModelError)
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
        widen=widen,
    )


__all__ = ["wrn"]
