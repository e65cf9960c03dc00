"""Building blocks shared by the model factories (never imported model-to-model)."""

from __future__ import annotations

import torch
from torch import nn


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


__all__ = ["DenseLayer", "PreActBlock", "Transition", "preact_head"]
