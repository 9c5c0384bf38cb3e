"""Model registry: ``build_model(name, input_shape=..., num_classes=...)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._shape import check_input_shape, check_num_classes
from .lenet import LeNet5, LeNet300
from .resnet import ResNet18
from .vgg import VGG

_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "lenet300": lambda shape, k: LeNet300(shape, k),
    "lenet5": lambda shape, k: LeNet5(shape, k),
    "lenet5bn": lambda shape, k: LeNet5(shape, k, batch_norm=True),
    "resnet18": lambda shape, k: ResNet18(shape, k),
    "vgg16": lambda shape, k: VGG(shape, k),
}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int | None = None,
) -> nn.Module:
    """A freshly initialized model (PyTorch's default init, which the constraint sizing assumes).

    Args:
        name: one of :data:`MODELS` (``lenet300``, ``lenet5``, ``lenet5bn``, ``resnet18``,
            ``vgg16``).
        input_shape: ``(C, H, W)`` of one input, e.g. ``Dataset.input_shape``.
        num_classes: outputs.
        seed: if given, initialize from ``torch.manual_seed(seed)`` inside a forked RNG, so the
            global RNG stream is left as it was; else draw from the global RNG.

    Example:
        >>> model = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10, seed=0)
        >>> sum(p.numel() for p in model.parameters())
        266610
    """
    if name not in _BUILDERS:
        raise ValueError(f"Invalid model: {name!r} (expected one of {', '.join(MODELS)})")
    shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    if seed is None:
        return _BUILDERS[name](shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](shape, num_classes)
