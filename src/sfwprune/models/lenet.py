"""LeNet-300-100 and LeNet-5 (LeCun et al. 1998), sized to the input; LeNet-5 optionally with BN.

LeNet-300-100:  flatten -> 300 -> 100 -> classes (ReLU).
LeNet-5:        conv 6@5×5 -> ReLU -> maxpool 2 -> conv 16@5×5 -> ReLU -> maxpool 2
                -> 120 -> 84 -> classes (ReLU).
A conv gets padding 2 ("same") when its input is smaller than 32 (conv 1) or 6 (conv 2), so
28×28 inputs give the classic 16×5×5 features like 32×32 ones, and 8×8 inputs still work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._shape import check_input_shape, check_num_classes


class LeNet300(nn.Module):
    """Fully connected ``C·H·W -> 300 -> 100 -> num_classes``.

    Example:
        >>> sum(p.numel() for p in LeNet300((1, 28, 28), 10).parameters())
        266610
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        c, h, w = check_input_shape(input_shape)
        self.features = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(c * h * w, 300),
            nn.ReLU(inplace=True),
            nn.Linear(300, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, check_num_classes(num_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_padding(size: int, threshold: int) -> int:
    return 2 if size < threshold else 0


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; ``batch_norm=True`` adds BatchNorm after each conv.

    Args:
        input_shape: ``(C, H, W)``, H and W at least 4.
        num_classes: outputs.
        batch_norm: ``BatchNorm2d`` between each conv and its ReLU (the ``lenet5bn`` model).

    Example:
        >>> LeNet5((1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        *,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        c, h, w = check_input_shape(input_shape)
        if h < 4 or w < 4:
            raise ValueError(f"Invalid input_shape: {input_shape!r} (LeNet-5 needs H, W >= 4)")
        pad1 = (_conv_padding(h, 32), _conv_padding(w, 32))
        h, w = (h + 2 * pad1[0] - 4) // 2, (w + 2 * pad1[1] - 4) // 2
        pad2 = (_conv_padding(h, 6), _conv_padding(w, 6))
        h, w = (h + 2 * pad2[0] - 4) // 2, (w + 2 * pad2[1] - 4) // 2

        def block(cin: int, cout: int, pad: tuple[int, int]) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=pad)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return [*layers, nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(c, 6, pad1), *block(6, 16, pad2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(16 * h * w, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, check_num_classes(num_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
