"""Checks shared by the model builders."""

from __future__ import annotations

from collections.abc import Sequence


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of positive ints, else ``ValueError``."""
    shape = tuple(input_shape)
    if len(shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
    ):
        raise ValueError(f"Invalid input_shape: {input_shape!r} (expected (C, H, W) positive ints)")
    return shape  # type: ignore[return-value]


def check_num_classes(num_classes: int) -> int:
    """A class count >= 2, else ``ValueError``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes!r} (expected an int >= 2)")
    return num_classes
