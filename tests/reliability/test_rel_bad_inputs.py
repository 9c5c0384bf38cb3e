"""A table of bad inputs across the API and the CLI.

For each row: the API raises ``ValueError``/``FileNotFoundError`` whose message names the bad
value; the CLI (``sfwprune.cli.main`` in this process, and a few rows through a real
``python -m sfwprune``) prints exactly one line on stderr, exits 2, shows no traceback, and leaves
the folder exactly as it was (no partial output files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sfwprune.cli import main
from sfwprune.constraints import KSparsePolytope, LpBall, make_constraint
from sfwprune.data import load_cifar10, load_dataset
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    load_checkpoint,
    load_trained,
    read_config,
    train_run,
)
from sfwprune.experiments.sweep import SweepConfig, sweep_run
from sfwprune.models import build_model
from sfwprune.prune import check_sparsity, load_pruned, prune_, save_pruned
from sfwprune.train import OptimizerSpec, build_optimizer, lr_factor

TINY = {"dataset": "synthetic", "model": "lenet300", "limit": 128, "batch_size": 64, "epochs": 1}
T = ["train", "--dataset", "synthetic", "--model", "lenet300", "--limit", "128", "--epochs", "1"]


def _model(name: str = "lenet300"):
    return build_model(name, input_shape=(1, 8, 8), num_classes=10, seed=0)


def _edit_config(run: Path, **changes) -> None:
    values = json.loads((run / CONFIG_FILE).read_text())
    values["config"].update(changes)
    (run / CONFIG_FILE).write_text(json.dumps(values))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@dataclass
class Row:
    """One bad input: how the API and the CLI are given it, and what their errors must say."""

    id: str
    api: Callable[[SimpleNamespace], object] | None
    api_error: type[Exception]
    api_says: str  # substring of the API message; "{...}" fields are filled from the context
    cli: list[str] | None
    cli_says: str
    prep: Callable[[SimpleNamespace], None] | None = None
    xfail: str | None = None
    marks: list = field(default_factory=list)


ROWS = [
    Row("sparsity 1.5",
        lambda c: prune_(_model(), 1.5), ValueError, "Invalid sparsity: 1.5",
        ["prune", "{run}", "--sparsity", "1.5", "--out", "{tmp}/p.pt"], "Invalid sparsity: 1.5"),
    Row("sparsity -0.1",
        lambda c: SweepConfig(sparsities=(-0.1,)).validate(), ValueError, "Invalid sparsity: -0.1",
        ["sweep", "{run}", "--sparsities", "-0.1"], "Invalid sparsity: -0.1"),
    Row("gradual without reconstruct",
        lambda c: SweepConfig(gradual=True).validate(), ValueError, "Invalid gradual: True",
        ["sweep", "{run}", "--gradual"], "Invalid gradual: True"),
    Row("gradual step outside (0, 1]",
        lambda c: SweepConfig(reconstruct=True, gradual=True, gradual_step=1.5).validate(),
        ValueError, "Invalid gradual_step: 1.5",
        ["sweep", "{run}", "--reconstruct", "--gradual", "--gradual-step", "0"],
        "Invalid gradual_step: 0.0"),
    Row("sparsity nan",
        lambda c: check_sparsity(float("nan")), ValueError, "Invalid sparsity: nan",
        ["sweep", "{run}", "--sparsities", "0.5,nan"], "Invalid sparsity: nan"),
    Row("k = 0",
        lambda c: KSparsePolytope(n=10, k=0, radius=1.0), ValueError, "Invalid k: 0",
        [*T, "--k-min", "0", "--out", "{tmp}/new"], "Invalid k_min: 0"),
    Row("k > n",
        lambda c: KSparsePolytope(n=10, k=11, radius=1.0), ValueError, "Invalid k: 11",
        [*T, "--k-frac", "1.5", "--out", "{tmp}/new"], "Invalid k_frac: 1.5"),
    Row("radius -1",
        lambda c: LpBall(n=10, p=2, radius=-1.0), ValueError, "Invalid radius: -1",
        [*T, "--radius-scale", "-1", "--out", "{tmp}/new"], "Invalid radius_scale: -1"),
    Row("p = 0.5",
        lambda c: LpBall(n=10, p=0.5, radius=1.0), ValueError, "Invalid p: 0.5", None, ""),
    Row("lp set without p",
        lambda c: make_constraint("lp", 10, radius=1.0), ValueError, "Invalid p: None",
        [*T, "--constraint", "lp", "--out", "{tmp}/new"], "Invalid p: None"),
    Row("unknown dataset",
        lambda c: load_dataset("mnist-typo"), ValueError, "Invalid dataset: 'mnist-typo'",
        [*T, "--dataset", "mnist-typo", "--out", "{tmp}/new"], "Invalid dataset: 'mnist-typo'"),
    Row("unknown model",
        lambda c: _model("resnet50"), ValueError, "Invalid model: 'resnet50'",
        [*T, "--model", "resnet50", "--out", "{tmp}/new"], "Invalid model: 'resnet50'"),
    Row("unknown optimizer",
        lambda c: build_optimizer(_model(), OptimizerSpec("adam")), ValueError,
        "Invalid optimizer: 'adam'",
        [*T, "--optimizer", "adam", "--out", "{tmp}/new"], "Invalid optimizer: 'adam'"),
    Row("unknown schedule",
        lambda c: lr_factor("linear", 0, 10), ValueError, "Invalid schedule: 'linear'",
        [*T, "--schedule", "linear", "--out", "{tmp}/new"], "Invalid schedule: 'linear'"),
    Row("unknown constraint",
        lambda c: make_constraint("l3", 10), ValueError, "'l3'",
        [*T, "--constraint", "l3", "--out", "{tmp}/new"], "Invalid constraint: 'l3'"),
    Row("unknown scope",
        lambda c: prune_(_model(), 0.5, scope="local"), ValueError, "Invalid scope: 'local'",
        ["sweep", "{run}", "--scope", "local"], "Invalid scope: 'local'"),
    Row("unknown criterion",
        lambda c: prune_(_model(), 0.5, criterion="gradient"), ValueError,
        "Invalid criterion: 'gradient'",
        ["sweep", "{run}", "--criterion", "gradient"], "Invalid criterion: 'gradient'"),
    Row("unknown include",
        lambda c: prune_(_model(), 0.5, include="biases"), ValueError, "Invalid include: 'biases'",
        ["prune", "{run}", "--sparsity", "0.5", "--include", "biases", "--out", "{tmp}/p.pt"],
        "Invalid include: 'biases'"),
    Row("unknown export dtype",
        lambda c: save_pruned(_model(), c.tmp / "p.pt", dtype=torch.int8), ValueError,
        "Invalid dtype: torch.int8",
        ["prune", "{run}", "--sparsity", "0.5", "--dtype", "float8", "--out", "{tmp}/p.pt"],
        "Invalid dtype: 'float8'"),
    Row("missing data folder (fashion-mnist)",
        lambda c: load_dataset("fashion-mnist", data_dir=c.empty), FileNotFoundError, "{empty}",
        [*T, "--dataset", "fashion-mnist", "--data-dir", "{empty}", "--out", "{tmp}/new"],
        "Invalid data_dir: '{empty}'"),
    Row("missing data folder (cifar10)",
        lambda c: load_cifar10(data_dir=c.tmp / "nowhere"), FileNotFoundError, "{tmp}/nowhere",
        [*T, "--dataset", "cifar10", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/new"],
        "{tmp}/nowhere"),
    Row("empty checkpoint",
        lambda c: load_checkpoint(c.run), ValueError, "it is empty",
        ["sweep", "{run}"], "checkpoint.pt' (it is empty)",
        prep=lambda c: (c.run / CHECKPOINT_FILE).write_bytes(b"")),
    Row("truncated checkpoint",
        lambda c: load_checkpoint(c.run), ValueError, "truncated or corrupt",
        ["prune", "{run}", "--sparsity", "0.5", "--out", "{tmp}/p.pt"], "truncated or corrupt",
        prep=lambda c: _truncate(c.run / CHECKPOINT_FILE)),
    Row("checkpoint from another model",
        lambda c: load_trained(c.run, device="cpu"), ValueError,
        "checkpoint.pt was made with another config than config.json",
        ["sweep", "{run}"], "checkpoint vs config.json",
        prep=lambda c: _edit_config(c.run, model="lenet5")),
    Row("pruned file of another model",
        lambda c: load_pruned(c.tmp / "p.pt", _model("lenet5")),
        ValueError, "do not match the model", None, "",
        prep=lambda c: save_pruned(_model(), c.tmp / "p.pt")),
    Row("unwritable output folder (train)",
        lambda c: train_run(TrainConfig(**TINY), c.blocker / "run", quiet=True), ValueError,
        "{blocker}/run", [*T, "--out", "{blocker}/run"], "{blocker}/run"),
    Row("unwritable output folder (prune)",
        lambda c: save_pruned(_model(), c.blocker / "p.pt"), FileNotFoundError, "{blocker}/p.pt",
        ["prune", "{run}", "--sparsity", "0.5", "--out", "{blocker}/p.pt"], "{blocker}/p.pt"),
    Row("output path is a folder",
        lambda c: save_pruned(_model(), c.empty), ValueError, "{empty}' (it is a folder",
        ["prune", "{run}", "--sparsity", "0.5", "--out", "{empty}"], "it is a folder"),
    Row("non-numeric --lr",
        lambda c: TrainConfig.from_dict({"lr": "abc"}), ValueError, "Invalid lr: 'abc'",
        [*T, "--lr", "abc", "--out", "{tmp}/new"], "invalid float value: 'abc'"),
    Row("non-numeric --epochs",
        lambda c: TrainConfig.from_dict({"epochs": "x"}), ValueError, "Invalid epochs: 'x'",
        [*T, "--epochs", "x", "--out", "{tmp}/new"], "invalid int value: 'x'"),
    Row("negative epochs",
        lambda c: TrainConfig.from_dict({"epochs": -3}), ValueError, "Invalid epochs: -3",
        [*T, "--epochs", "-3", "--out", "{tmp}/new"], "Invalid epochs: -3"),
    Row("lr nan",
        lambda c: TrainConfig.from_dict({"lr": float("nan")}), ValueError, "Invalid lr: nan",
        [*T, "--lr", "nan", "--out", "{tmp}/new"], "Invalid lr: nan"),
    Row("momentum 1",
        lambda c: TrainConfig.from_dict({"momentum": 1.0}), ValueError, "Invalid momentum: 1.0",
        [*T, "--momentum", "1", "--out", "{tmp}/new"], "Invalid momentum: 1.0"),
    Row("limit 0",
        lambda c: TrainConfig.from_dict({"limit": 0}), ValueError, "Invalid limit: 0",
        [*T, "--limit", "0", "--out", "{tmp}/new"], "Invalid limit: 0"),
    Row("--threads 0", None, ValueError, "", ["--threads", "0", *T, "--out", "{tmp}/new"],
        "Invalid --threads: 0"),
    Row("--resume with another config",
        lambda c: train_run(TrainConfig.from_dict({**TINY, "lr": 0.5}), c.run, resume=True, quiet=True),
        ValueError, "another config",
        [*T, "--batch-size", "64", "--lr", "0.5", "--resume", "--out", "{run}"],
        "another config"),
    Row("existing run without --resume",
        lambda c: train_run(TrainConfig(**TINY), c.run, quiet=True), ValueError,
        "holds a run already",
        [*T, "--batch-size", "64", "--out", "{run}"], "holds a run already"),
    Row("bad --config JSON",
        lambda c: TrainConfig.from_json(c.tmp / "bad.json"), ValueError, "{tmp}/bad.json",
        ["train", "--config", "{tmp}/bad.json", "--out", "{tmp}/new"], "not JSON",
        prep=lambda c: (c.tmp / "bad.json").write_text('{"epochs": 3,')),
    Row("unknown config key",
        lambda c: TrainConfig.from_json(c.tmp / "typo.json"), ValueError,
        "Invalid config key: 'lerning_rate'",
        ["train", "--config", "{tmp}/typo.json", "--out", "{tmp}/new"],
        "Invalid config key: 'lerning_rate'",
        prep=lambda c: (c.tmp / "typo.json").write_text('{"lerning_rate": 0.1}')),
    Row("missing --config file",
        lambda c: TrainConfig.from_json(c.tmp / "none.json"), FileNotFoundError,
        "{tmp}/none.json",
        ["train", "--config", "{tmp}/none.json", "--out", "{tmp}/new"], "{tmp}/none.json"),
    Row("sweep of a folder with no run",
        lambda c: sweep_run(c.empty, SweepConfig()), FileNotFoundError, "no config.json",
        ["sweep", "{empty}"], "no config.json"),
    Row("corrupt sweep.json for plot", None, ValueError, "",
        ["plot", "{run}", "--out", "{tmp}/acc.png"], "Invalid sweep file: '{run}/sweep.json'",
        prep=lambda c: (c.run / "sweep.json").write_text('{"rows": [')),
    Row("corrupt config.json in a run",
        lambda c: read_config(c.run), ValueError, "{run}/config.json",
        ["sweep", "{run}"], "config.json",
        prep=lambda c: (c.run / CONFIG_FILE).write_text('{"config": {"epochs": 1')),
    Row("config.json without a config entry",
        lambda c: read_config(c.run), ValueError, "config.json",
        ["sweep", "{run}"], "config.json",
        prep=lambda c: (c.run / CONFIG_FILE).write_text('{"provenance": {}}')),
]  # fmt: skip


@pytest.fixture
def ctx(run_copy, tmp_path, monkeypatch) -> SimpleNamespace:
    """Paths the rows refer to; no dataset can come from outside ``tmp_path``."""
    import sfwprune.data.fashion_mnist as fashion_mnist

    monkeypatch.delenv("SFWPRUNE_DATA", raising=False)
    # the dataset download cache: outside tmp_path, and never created by a failing load
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    # this machine has /usr/share/datasets/fashion-mnist: hide it, as on a machine without it
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-copy")
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, so nothing can be created under it\n")
    return SimpleNamespace(tmp=tmp_path, run=run_copy, empty=empty, blocker=blocker)


def _fill(text: str, c: SimpleNamespace) -> str:
    return text.format(tmp=c.tmp, run=c.run, empty=c.empty, blocker=c.blocker)


def _params():
    for row in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []
        yield pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", _params())
def test_bad_input(row: Row, ctx, capsys, listing) -> None:
    if row.prep is not None:
        row.prep(ctx)
    if row.api is not None:
        before = listing(ctx.tmp)
        with pytest.raises(row.api_error) as info:
            row.api(ctx)
        assert _fill(row.api_says, ctx) in str(info.value)
        assert listing(ctx.tmp) == before
    if row.cli is not None:
        before = listing(ctx.tmp)
        code = main([_fill(a, ctx) for a in row.cli])
        out, err = capsys.readouterr()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.endswith("\n"), err
        assert err.startswith("sfwprune") and "Traceback" not in err
        assert _fill(row.cli_says, ctx) in err, err
        assert listing(ctx.tmp) == before  # no partial output files, no new folders


def test_table_covers_twenty_inputs_on_both_sides() -> None:
    both = [r for r in ROWS if r.api is not None and r.cli is not None and not r.xfail]
    assert len(ROWS) >= 20 and len(both) >= 20


def test_api_train_run_with_missing_data_leaves_no_folder(ctx) -> None:
    cfg = TrainConfig(**{**TINY, "dataset": "cifar10", "data_dir": str(ctx.tmp / "nowhere")})
    with pytest.raises(FileNotFoundError):
        train_run(cfg, ctx.tmp / "new", quiet=True)
    assert not (ctx.tmp / "new").exists()


# --- the same through a real process: what a user at a shell sees ----------------------------


@pytest.mark.parametrize(
    "argv, says",
    [
        ([*T, "--lr", "abc", "--out", "{tmp}/new"], "invalid float value: 'abc'"),
        (["sweep", "{run}"], "truncated or corrupt"),
    ],
    ids=["non-numeric-lr", "truncated-checkpoint"],
)
def test_bad_input_in_a_real_process(argv, says, ctx, child_env, listing) -> None:
    _truncate(ctx.run / CHECKPOINT_FILE)
    before = listing(ctx.tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "sfwprune", *[_fill(a, ctx) for a in argv]],
        env=child_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert listing(ctx.tmp) == before
