"""ResNet-18 and ResNet-34 (He et al.) adapted to 32x32 inputs, from torchvision's blocks.

The stem is a 3x3 stride-1 conv-BN-ReLU with no max pool (the usual CIFAR adaptation of the
ImageNet 7x7 stride-2 conv + max pool), then four stages of torchvision ``BasicBlock`` s of
widths 64, 128, 256, 512; stages 2-4 halve height and width in their first block, whose
shortcut is torchvision's 1x1 strided conv + BN. Units: ``conv1`` (the stem), then one unit
per block, ``block1.1`` ... ``block4.n`` (1-based, like ``wrn``). Cut points are the stage
ends. The head is global average pool - flatten - Linear(512, num_classes).

For 3x32x32 inputs the stage ends are (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4);
for 1x28x28 inputs (64, 28, 28), (128, 14, 14), (256, 7, 7), (512, 4, 4).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock

from prefast.models.base import UnitModel
from prefast.models.registry import build, check_common, register_model

_WIDTHS = (64, 128, 256, 512)


def _resnet(
    name: str, blocks: Sequence[int], num_classes: int, in_channels: int, image_size: int
) -> UnitModel:
    """The shared body of `resnet18` and `resnet34`: ``blocks[s]`` basic blocks in stage s."""
    check_common(name, num_classes, in_channels, image_size)
    units: list[nn.Module] = [
        nn.Sequential(  # (C_in, H, W) -> (64, H, W)
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
    ]
    names = ["conv1"]
    transition_after: list[int] = []
    channels = 64
    for stage, (width, count) in enumerate(zip(_WIDTHS, blocks, strict=True), start=1):
        for b in range(1, count + 1):
            stride = 2 if stage > 1 and b == 1 else 1  # (C, H, W) -> (width, ceil(H/2), ...)
            downsample = None
            if stride != 1 or channels != width:  # torchvision's shortcut: conv1x1 + BN
                downsample = nn.Sequential(
                    nn.Conv2d(channels, width, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(width),
                )
            units.append(BasicBlock(channels, width, stride=stride, downsample=downsample))
            names.append(f"block{stage}.{b}")
            channels = width
        transition_after.append(len(units) - 1)  # stage end: (width, H / 2^(stage-1), ...)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return build(
        name,
        units,
        names,
        head,
        transition_after,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
    )


@register_model("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> UnitModel:
    """ResNet-18 for 32x32 (or 28x28) inputs: the stem and 2, 2, 2, 2 basic blocks, 9 units.

    Cut points (3, 5, 7, 9). Initialised by FreezeOut's reference init
    (`prefast.models.base.reference_init_`), not torchvision's ResNet init: convolutions and
    BN agree (N(0, sqrt(2 / fan_out)), weight 1, bias 0), but the classifier's bias is 0.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        image_size: input height = width.
    """
    return _resnet("resnet18", (2, 2, 2, 2), num_classes, in_channels, image_size)


@register_model("resnet34")
def resnet34(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> UnitModel:
    """ResNet-34 for 32x32 (or 28x28) inputs: the stem and 3, 4, 6, 3 basic blocks, 17 units.

    Cut points (4, 8, 14, 17). Initialised like `resnet18` (FreezeOut's reference init, not
    torchvision's).

    Args:
        num_classes: classifier outputs.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        image_size: input height = width.
    """
    return _resnet("resnet34", (3, 4, 6, 3), num_classes, in_channels, image_size)


__all__ = ["resnet18", "resnet34"]
