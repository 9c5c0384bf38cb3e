"""The GPU recipes in configs/ load as TrainConfig and carry the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfwprune.experiments.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))


def test_there_are_recipes_for_each_paper_setting() -> None:
    names = {p.stem for p in CONFIGS}
    for ds in ("cifar10", "tinyimagenet"):
        for model in ("resnet18", "vgg16"):
            assert {f"{ds}_{model}_sfw", f"{ds}_{model}_sgd"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_loads_with_paper_defaults(path: Path) -> None:
    cfg = TrainConfig.from_json(path)
    assert cfg.epochs == 180 and cfg.batch_size == 128 and cfg.schedule == "step"
    assert cfg.use_augment
    opt = cfg.optimizer
    if opt.name == "sfw":
        assert (opt.lr, opt.k_frac, opt.radius_scale, opt.rescale) == (1.0, 0.05, 15.0, "gradient")
    else:
        assert (opt.lr, opt.weight_decay) == (0.1, 5e-4)
