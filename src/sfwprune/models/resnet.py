"""ResNet-18 in its CIFAR form (He et al. 2016; the layout of the common CIFAR code).

stem: conv 3×3 (stride 1, no max pool) -> BN -> ReLU; four stages of two BasicBlocks with
64, 128, 256, 512 channels and strides 1, 2, 2, 2; global average pool; linear classifier.
BasicBlock: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, shortcut a 1×1 conv + BN when
the shape changes. About 11.17M parameters for 3×32×32 inputs and 10 classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._shape import check_input_shape, check_num_classes


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 for any ``(C, H, W)`` input (adaptive average pooling at the end).

    Example:
        >>> round(sum(p.numel() for p in ResNet18((3, 32, 32), 10).parameters()) / 1e6, 2)
        11.17
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        blocks: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        c, _, _ = check_input_shape(input_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = 64
        for i, (channels, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        # a module, not torch.flatten: the classifier's input is then a module's output, which
        # calibrated reconstruction rebuilds from the last stage's cached input (no parameters)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, check_num_classes(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))
