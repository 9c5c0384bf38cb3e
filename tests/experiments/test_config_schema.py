"""One config owner: TrainConfig (nesting OptimizerSpec) is the schema of config.json, of the
--config files, of the train flags and of the checks; old files and old names still load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sfwprune.cli import build_parser, main
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.flags import _leaf_fields
from sfwprune.train import OptimizerSpec

ROOT = Path(__file__).resolve().parents[2]
# a config.json written before the optimizer was nested (the first grid's lenet300/sfw/seed0)
OLD_RUN_CONFIG = Path(__file__).parent / "data" / "old_run_config.json"


def test_a_real_old_config_json_loads_into_the_nested_schema() -> None:
    stored = json.loads(OLD_RUN_CONFIG.read_text())["config"]
    assert {"value", "mode", "constrain"} <= set(stored) and stored["optimizer"] == "sfw"
    cfg = TrainConfig.from_dict(stored)
    assert cfg.optimizer == OptimizerSpec(
        "sfw", lr=stored["lr"], k_frac=stored["k_frac"], radius_scale=stored["value"],
        radius_from=stored["mode"], constrained_tensors=stored["constrain"],
    )  # fmt: skip
    assert (cfg.epochs, cfg.seed) == (stored["epochs"], stored["seed"])


@pytest.mark.parametrize(
    "cfg",
    [TrainConfig(), TrainConfig.from_dict({"optimizer": "sgd", "lr": 0.05, "augment": True,
                                          "limit": 7, "label_smoothing": 0.1})],
)  # fmt: skip
def test_saved_config_reads_back_exactly(cfg: TrainConfig) -> None:
    text = json.dumps(cfg.to_dict())
    back = TrainConfig.from_dict(json.loads(text))
    assert back == cfg and json.dumps(back.to_dict()) == text
    assert isinstance(back.optimizer, OptimizerSpec)


def test_old_names_are_aliases_and_the_new_name_wins() -> None:
    old = TrainConfig.from_dict({"value": 5, "mode": "radius", "constrain": "weights"})
    assert (old.optimizer.radius_scale, old.optimizer.radius_from) == (5.0, "radius")
    assert old.optimizer.constrained_tensors == "weights"
    assert isinstance(old.optimizer.radius_scale, float)  # a JSON integer for a float field
    both = TrainConfig.from_dict({"optimizer": {"value": 5.0, "radius_scale": 7.0}})
    assert both.optimizer.radius_scale == 7.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"sfw_init": "false"}, "Invalid sfw_init: 'false' (expected true or false"),
        ({"augment": "no"}, "Invalid augment: 'no'"),
        ({"epochs": 2.0}, "Invalid epochs: 2.0 (expected an integer >= 1)"),
        ({"seed": True}, "Invalid seed: True"),
        ({"lr": "0.1"}, "Invalid lr: '0.1'"),
        ({"optimizer": {"name": "adam"}}, "Invalid optimizer: 'adam'"),
        ({"optimizer": 3}, "Invalid optimizer: 3"),
        ({"device": 5}, "Invalid device: 5"),
        ({"label_smoothing": 1.5}, "Invalid label_smoothing: 1.5"),
        ({"optimizer": {"k_fraction": 0.1}}, "Invalid config key: 'k_fraction'"),
        ({"name": "sgd"}, "Invalid config key: 'name'"),
    ],
)
def test_values_are_checked_by_their_field_type(values, message) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(values)
    assert message in str(info.value)


def test_string_boolean_in_a_config_file_is_refused_by_the_cli(tmp_path, capsys) -> None:
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dataset": "synthetic", "sfw_init": "false"}))
    assert main(["train", "--config", str(conf), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Invalid sfw_init: 'false'" in err
    assert not (tmp_path / "r").exists()


def test_every_field_is_a_train_flag_with_its_help() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"]
    by_dest = {a.dest: a for a in train._actions}
    for f, _ in _leaf_fields(TrainConfig):
        action = by_dest[f.name]
        flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
        assert flag in action.option_strings
        assert f.metadata["help"] in action.help
    assert "--value" in by_dest["radius_scale"].option_strings  # the old flag still works
    assert "--mode" in by_dest["radius_from"].option_strings
    assert "--constrain" in by_dest["constrained_tensors"].option_strings


def test_flags_override_a_config_file_and_only_given_flags_count(tmp_path) -> None:
    from sfwprune.cli import _train_config

    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"optimizer": {"name": "sgd", "lr": 0.2}, "epochs": 3}))
    args = build_parser().parse_args(
        ["train", "--config", str(conf), "--label-smoothing", "0.1", "--rescale", "none",
         "--no-sfw-init", "--out", str(tmp_path / "r")]
    )  # fmt: skip
    cfg = _train_config(args)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.epochs) == ("sgd", 0.2, 3)
    assert cfg.label_smoothing == 0.1 and cfg.optimizer.rescale is None and cfg.sfw_init is False
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert cfg.batch_size == defaults["batch_size"]
