"""Run configuration: one dataclass with defaults, loadable from JSON, overridable from the CLI.

The resolved config is written next to every result (``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constraints.groups import KINDS, MODES
from ..data import DATASETS
from ..models import MODELS
from ..optim.sfw import RESCALES
from ..train import OPTIMIZERS, PRECISIONS, SCHEDULES, OptimizerSpec

DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the default for this choice"."""

    dataset: str = "fashion-mnist"
    model: str = "lenet300"
    # optimizer fields: OptimizerSpec owns their defaults (REFERENCE §3)
    optimizer: str = OptimizerSpec.name
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = OptimizerSpec.lr
    momentum: float = OptimizerSpec.momentum
    weight_decay: float | None = OptimizerSpec.weight_decay
    schedule: str = "step"
    constraint: str = OptimizerSpec.constraint
    k_frac: float = OptimizerSpec.k_frac
    k_min: int = OptimizerSpec.k_min
    value: float = OptimizerSpec.value
    mode: str = OptimizerSpec.mode
    rescale: str | None = OptimizerSpec.rescale
    constrain: str = OptimizerSpec.constrain
    sfw_init: bool = False
    sfw_init_iters: int | None = None
    # data and runtime
    data_dir: str | None = None
    augment: bool | None = None  # None: on for cifar10 / tiny-imagenet, off otherwise
    limit: int | None = None
    image_size: int | None = None
    eval_batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"

    def validate(self) -> TrainConfig:
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, MODELS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("constraint", self.constraint, KINDS)
        _choice("mode", self.mode, MODES)
        _choice("rescale", self.rescale, RESCALES)
        _choice("constrain", self.constrain, ("all", "weights"))
        _choice("precision", self.precision, PRECISIONS)
        for name in ("epochs", "batch_size", "eval_batch_size", "k_min"):
            _int(name, getattr(self, name), 1)
        _int("seed", self.seed, 0)
        for name in ("limit", "sfw_init_iters", "image_size"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
        if self.lr is not None:
            _number("lr", self.lr, 0.0, strict=True)
        if self.weight_decay is not None:
            _number("weight_decay", self.weight_decay, 0.0)
        _number("value", self.value, 0.0, strict=True)
        if not (0 < float(self.k_frac) <= 1):
            raise ValueError(f"Invalid k_frac: {self.k_frac!r} (expected a number in (0, 1])")
        if not 0 <= float(self.momentum) < 1:
            raise ValueError(f"Invalid momentum: {self.momentum!r} (expected a number in [0, 1))")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"Invalid device: {self.device!r} (expected auto, cpu or cuda[:N])")
        return self

    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(
            name=self.optimizer, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, constraint=self.constraint, k_frac=self.k_frac,
            k_min=self.k_min, value=self.value, mode=self.mode, rescale=self.rescale,
            constrain=self.constrain,
        )  # fmt: skip

    @property
    def use_augment(self) -> bool:
        if self.augment is not None:
            return bool(self.augment)
        return self.dataset in ("cifar10", "tiny-imagenet")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Invalid config key: {unknown[0]!r} (expected keys: {', '.join(sorted(known))})"
            )
        return cls(**values).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Invalid config file: {str(path)!r} (no such file)")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"Invalid config file: {str(path)!r} (not JSON: {exc})") from None
        if not isinstance(values, dict):
            raise ValueError(f"Invalid config file: {str(path)!r} (expected a JSON object)")
        values.pop("_comment", None)
        return cls.from_dict(values)

    def replace(self, **overrides: Any) -> TrainConfig:
        return dataclasses.replace(self, **overrides).validate()


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {shown})")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {low})")


def _number(name: str, value: Any, low: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ValueError(f"Invalid {name}: {value!r} (expected a number {op} {low:g})")


def parse_sparsities(text: str) -> list[float]:
    """``"0,0.5,0.9"`` -> ``[0.0, 0.5, 0.9]``; each in [0, 1]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            s = float(item)
        except ValueError:
            raise ValueError(
                f"Invalid sparsity: {item!r} (expected numbers in [0, 1], comma-separated)"
            ) from None
        if not 0.0 <= s <= 1.0:  # also refuses NaN
            raise ValueError(f"Invalid sparsity: {s!r} (expected a number in [0, 1])")
        out.append(s)
    if not out:
        raise ValueError(f"Invalid sparsities: {text!r} (expected at least one number)")
    return out
