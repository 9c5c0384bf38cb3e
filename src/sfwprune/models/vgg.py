"""VGG-16 with BatchNorm in its CIFAR form (Simonyan & Zisserman 2015; the common CIFAR code).

features: cfg ``[64, 64, M, 128, 128, M, 256×3, M, 512×3, M, 512×3, M]``, each number a
3×3 conv (padding 1) -> BN -> ReLU, each ``M`` a 2×2 max pool with ``ceil_mode`` (so 28×28 and
8×8 inputs shrink to 1×1 instead of 0×0; for 32/64 inputs it equals plain pooling); then an
adaptive average pool to 1×1 and one ``Linear(512, num_classes)``. About 14.73M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._shape import check_input_shape, check_num_classes

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG with BatchNorm for any ``(C, H, W)`` input.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: outputs.
        cfg: channel counts and ``"M"`` (max pool) markers; default VGG-16.

    Example:
        >>> VGG((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        cfg: Sequence[int | str] = VGG16_CFG,
    ) -> None:
        super().__init__()
        in_channels, _, _ = check_input_shape(input_shape)
        layers: list[nn.Module] = []
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ValueError(f"Invalid cfg entry: {item!r} (expected a channel count or 'M')")
            layers += [
                nn.Conv2d(in_channels, item, 3, padding=1),
                nn.BatchNorm2d(item),
                nn.ReLU(inplace=True),
            ]
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()  # a module: see ResNet18 (no parameters)
        self.classifier = nn.Linear(in_channels, check_num_classes(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))
