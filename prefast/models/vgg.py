"""VGG with batch norm for CIFAR-sized inputs.

Each conv-BN-ReLU is one unit; a max pool that follows a conv belongs to that conv's unit
(``ceil_mode=True`` so 28x28 inputs work: 28 -> 14 -> 7 -> 4 -> 2 -> 1). Unit names are
``conv{stage}.{index}`` (``conv1.1``, ``conv1.2``, ``conv2.1``, ...). The head is global
average pool (a no-op at 1x1) - flatten - Linear(512, num_classes).
"""

from __future__ import annotations

from torch import nn

from prefast.errors import ModelError, check_choice
from prefast.models.base import UnitModel
from prefast.models.registry import build, check_common, register_model

_NAME = "vgg"

# Convs per stage for each depth; stage widths are _WIDTHS, each stage ends in a max pool.
_WIDTHS = (64, 128, 256, 512, 512)
_STAGES: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}


@register_model(_NAME)
def vgg(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = 16,
) -> UnitModel:
    """VGG-depth with BN: one unit per conv-BN-ReLU (plus its following max pool).

    Cut points are the boundaries after each max-pool stage.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        image_size: input height = width.
        depth: 11, 13, 16 or 19.
    """
    check_common(_NAME, num_classes, in_channels, image_size)
    check_choice(f"{_NAME}: depth", depth, sorted(_STAGES), error=ModelError)

    units: list[nn.Module] = []
    names: list[str] = []
    transition_after: list[int] = []
    channels = in_channels
    for stage, (width, convs) in enumerate(zip(_WIDTHS, _STAGES[depth], strict=True), start=1):
        for index in range(1, convs + 1):
            layers: list[nn.Module] = [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if index == convs:  # (B, C, H, W) -> (B, C, ceil(H / 2), ceil(W / 2))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                transition_after.append(len(units))
            units.append(nn.Sequential(*layers))
            names.append(f"conv{stage}.{index}")
            channels = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

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
    )


__all__ = ["vgg"]
