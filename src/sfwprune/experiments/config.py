"""Run configuration: one dataclass with defaults, loadable from JSON, overridable from the CLI.

The resolved config is written next to every result (``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._checks import MAX_SEED, check_fields, option
from .._checks import parse_sparsities as parse_sparsities
from ..data import DATASETS
from ..models import MODELS
from ..train import PRECISIONS, SCHEDULES, OptimizerSpec

DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
# The grids' lr warm-up (epochs) for SFW runs that take one: a trace of the LeNet-5 runs that
# died in epoch 1 found a loss spike at lr 1 that momentum carried to a far vertex; in its 1-epoch
# runs a 0.2-epoch warm-up kept them alive (docs/algorithm.md §2).
SFW_WARMUP = 0.2


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the default for this choice".

    This dataclass (with the :class:`~sfwprune.train.OptimizerSpec` it nests) is the schema:
    the ``sfwprune train`` flags, their help, the checks and ``config.json`` all follow from
    its fields. Configs written before the optimizer was nested (flat keys, ``value``,
    ``mode``, ``constrain``) still load.
    """

    dataset: str = option("fashion-mnist", "dataset", choices=DATASETS)
    model: str = option("lenet300", "network", choices=MODELS)
    optimizer: OptimizerSpec = option(default_factory=OptimizerSpec, help="optimizer settings")
    epochs: int = option(10, "passes over the training set", low=1)
    batch_size: int = option(128, "global batch size (split over torchrun ranks)", low=1)
    schedule: str = option("step", "per-step lr schedule: step (÷10 at 1/3 and 2/3), cosine "
                           "or constant", choices=SCHEDULES)  # fmt: skip
    warmup_epochs: float = option(0.0, "linear lr warm-up over the first N epochs (may be "
                                  "fractional), multiplying the schedule", low=0)  # fmt: skip
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", low=0, high=1)
    acdc_sparsity: float | None = option(
        None, "AC/DC: alternate dense and fixed-mask sparse phases at this sparsity "
        "(docs/algorithm.md §8); default none (off)", low=0, high=1,
    )  # fmt: skip
    sfw_init: bool = option(False, "learn the init scales first (SFW-Init)")
    sfw_init_iters: int | None = option(None, "SFW-Init iterations (default: one epoch)", low=1)
    data_dir: str | None = option(None, "folder holding the dataset's files")
    augment: bool | None = option(None, "random crop + flip (default: on for cifar10 and "
                                  "tiny-imagenet)")  # fmt: skip
    limit: int | None = option(None, "use only the first N training images (quick runs)", low=1)
    image_size: int | None = option(None, "resize images to this side", low=1)
    eval_batch_size: int = option(1000, "batch size of evaluation", low=1)
    seed: int = option(0, "seed of the initialization and the data order", low=0, high=MAX_SEED)
    device: str = option("auto", "auto | cpu | cuda[:N]")
    precision: str = option("fp32", "fp32 | bf16 (autocast)", choices=PRECISIONS)

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, str):  # TrainConfig(optimizer="sgd"): the name alone
            self.optimizer = OptimizerSpec(self.optimizer)

    def validate(self) -> TrainConfig:
        check_fields(self)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"Invalid device: {self.device!r} (expected auto, cpu or cuda[:N])")
        return self

    @property
    def use_augment(self) -> bool:
        if self.augment is not None:
            return bool(self.augment)
        return self.dataset in ("cifar10", "tiny-imagenet")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A validated config from a ``config.json``-style dict: nested (``"optimizer": {...}``)
        or flat (the optimizer's keys at the top, older files), old key names included."""
        if not isinstance(values, dict):
            raise ValueError(f"Invalid config: {values!r} (expected a JSON object)")
        top = dict(values)
        nested = top.pop("optimizer", {})
        if isinstance(nested, str):
            nested = {"name": nested}
        elif isinstance(nested, OptimizerSpec):
            nested = dataclasses.asdict(nested)
        elif not isinstance(nested, dict):
            raise ValueError(
                f"Invalid optimizer: {nested!r} (expected a name or an object of optimizer settings)"
            )
        spec_keys = _keys(OptimizerSpec)
        spec_keys.pop("name")  # flat files name the optimizer "optimizer"
        opt = _typed(OptimizerSpec, _renamed(nested, _keys(OptimizerSpec), OptimizerSpec))
        flat = {k: v for k, v in top.items() if k in spec_keys}  # flat keys of older files
        opt.update(_typed(OptimizerSpec, _renamed(flat, spec_keys, OptimizerSpec)))
        rest = _typed(cls, _renamed({k: v for k, v in top.items() if k not in spec_keys},
                                    _keys(cls), cls))  # fmt: skip
        return cls(**rest, optimizer=OptimizerSpec(**opt)).validate()

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
        """A validated copy with ``overrides``: any field, optimizer fields included (flat)."""
        base = self.to_dict()
        if isinstance(overrides.get("optimizer"), str):  # --optimizer NAME keeps the settings
            overrides["optimizer"] = {**base["optimizer"], "name": overrides["optimizer"]}
        return TrainConfig.from_dict({**base, **overrides})


def _keys(cls: type) -> dict[str, str]:
    """Every accepted key of ``cls`` (field names and their aliases) -> field name."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.name
        for alias in f.metadata.get("aliases", ()):
            out[alias] = f.name
    return out


def _renamed(values: dict[str, Any], keys: dict[str, str], cls: type) -> dict[str, Any]:
    """Aliases renamed to their field names; an unknown key is an error naming the known ones."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            known = sorted(f.name for f in dataclasses.fields(cls))
            if cls is TrainConfig:
                known = sorted(set(known) | set(_field_names(OptimizerSpec)) - {"name"})
            raise ValueError(f"Invalid config key: {key!r} (expected keys: {', '.join(known)})")
        if keys[key] in out and key != keys[key]:
            continue  # the new name wins over its old alias
        out[keys[key]] = value
    return out


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """JSON numbers made to fit: an integer given for a float field becomes a float (so the
    config reads back equal to itself); everything else is checked, not converted."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        if hint in (float, float | None) and type(value) is int:
            out[name] = float(value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):  # JSON has lists
            item = typing.get_args(hint)[0]
            out[name] = tuple(float(v) if item is float and type(v) is int else v for v in value)
    return out
