"""End to end through the CLI: train -> sweep -> prune -> plot on small data, files and schema."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sfwprune.cli import main
from sfwprune.models import build_model
from sfwprune.prune import load_pruned

TRAIN = ["--dataset", "synthetic", "--model", "lenet300", "--limit", "256", "--batch-size", "64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    assert (
        main(["--quiet", "train", *TRAIN, "--epochs", "2", "--out", str(out), "--seed", "3"]) == 0
    )
    return out


def test_train_writes_config_metrics_checkpoint(run_dir: Path) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["config"]["optimizer"]["name"] == "sfw" and cfg["config"]["seed"] == 3
    prov = cfg["provenance"]
    for key in ("git_revision", "versions", "device", "torch_threads", "created"):
        assert key in prov
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    for key in (
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "test_loss",
        "lr",
        "epoch_seconds",
    ):
        assert key in json.loads(lines[-1])
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "scheduler", "loader", "rng"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["provenance"]["wall_seconds"] > 0


def test_sweep_schema_and_csv(run_dir: Path, capsys) -> None:
    assert main(["sweep", str(run_dir), "--sparsities", "0,0.5,0.9"]) == 0
    printed = capsys.readouterr().out
    assert "sparsity" in printed and "90.00%" in printed
    result = json.loads((run_dir / "sweep.json").read_text())
    assert set(result) == {"config", "provenance", "run", "rows"}
    assert result["run"]["epoch"] == 2 and result["run"]["finished"] is True
    assert result["config"]["sweep"]["sparsities"] == [0.0, 0.5, 0.9]
    rows = result["rows"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.5, 0.9]
    for r in rows:
        assert set(r) >= {"sparsity", "measured_sparsity", "accuracy", "loss"}
        assert abs(r["measured_sparsity"] - r["sparsity"]) < 1e-3
        assert 0.0 <= r["accuracy"] <= 100.0
    with open(run_dir / "sweep.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["sparsity"]) for r in table] == [0.0, 0.5, 0.9]
    # the dense row equals the run's own final test accuracy
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[0]["accuracy"] == pytest.approx(last["test_accuracy"])


def test_prune_exports_a_loadable_sparse_model(run_dir: Path, capsys, tmp_path) -> None:
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(run_dir), "--sparsity", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compression" in printed and "test accuracy at 90% sparsity" in printed
    model = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    load_pruned(out, model)
    weights = [p for p in model.parameters() if p.dim() > 1]
    zeros = sum(int((p == 0).sum()) for p in weights)
    assert abs(zeros / sum(p.numel() for p in weights) - 0.9) < 1e-3


def test_plot_writes_figures(run_dir: Path, tmp_path) -> None:
    main(["sweep", str(run_dir)])
    for extra, name in (([], "acc.png"), (["--weights"], "w.png")):
        out = tmp_path / name
        assert main(["plot", str(run_dir), "--out", str(out), *extra]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_interruption_matches_uninterrupted(tmp_path) -> None:
    from sfwprune.experiments.config import TrainConfig
    from sfwprune.experiments.runner import train_run

    cfg = TrainConfig(dataset="synthetic", model="lenet300", epochs=3, limit=256, batch_size=64,
                      schedule="cosine", seed=1)  # fmt: skip
    full = train_run(cfg, tmp_path / "full", quiet=True)
    train_run(cfg, tmp_path / "cut", quiet=True, stop_after_epoch=1)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = train_run(cfg, tmp_path / "cut", resume=True, quiet=True)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [m["epoch"] for m in resumed.metrics] == [1, 2, 3]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_sgd_and_constraint_flags_recorded(tmp_path) -> None:
    out = tmp_path / "sgd"
    args = ["--quiet", "train", *TRAIN, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05",
            "--schedule", "cosine", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    opt = cfg["optimizer"]
    assert opt["name"] == "sgd" and opt["lr"] == 0.05 and cfg["schedule"] == "cosine"
    out = tmp_path / "ksup"
    args = ["--quiet", "train", *TRAIN, "--epochs", "1", "--constraint", "k_support", "--k-frac",
            "0.1", "--radius-scale", "5", "--rescale", "diameter", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    opt = cfg["optimizer"]
    assert (opt["constraint"], opt["k_frac"], opt["radius_scale"], opt["rescale"]) == (
        "k_support",
        0.1,
        5.0,
        "diameter",
    )


def test_config_file_and_flag_override(tmp_path) -> None:
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dataset": "synthetic", "model": "lenet300", "epochs": 1, "limit": 128,
                                "value": 7.0}))  # fmt: skip
    out = tmp_path / "r"
    # an old flat --config file with the old key "value", and the old flag --value
    assert main(["--quiet", "train", "--config", str(conf), "--value", "9", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["optimizer"]["radius_scale"] == 9.0 and cfg["epochs"] == 1
    assert "value" not in cfg["optimizer"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["train", "--dataset", "imagenet-1k", "--out", "{tmp}/x"],
            "Invalid dataset: 'imagenet-1k'",
        ),
        (["train", "--model", "resnet50", "--out", "{tmp}/x"], "Invalid model: 'resnet50'"),
        (["train", "--optimizer", "adam", "--out", "{tmp}/x"], "Invalid optimizer: 'adam'"),
        (["train", "--epochs", "many", "--out", "{tmp}/x"], "invalid int value: 'many'"),
        (["train", "--bogus-flag", "--out", "{tmp}/x"], "unrecognized arguments"),
        (
            [
                "train",
                "--dataset",
                "cifar10",
                "--data-dir",
                "{tmp}/nothing-here",
                "--out",
                "{tmp}/x",
            ],
            "CIFAR-10",
        ),
        (["sweep", "{tmp}", "--sparsities", "0.5,1.5"], "Invalid sparsity: 1.5"),
        (["sweep", "{tmp}", "--sparsities", "nan"], "Invalid sparsity"),
        (["sweep", "{tmp}/no-run"], "no config.json"),
        (["prune", "{tmp}", "--sparsity", "-0.1", "--out", "{tmp}/p.pt"], "Invalid sparsity: -0.1"),
    ],
)
def test_bad_input_one_line_exit_2(argv, needle, tmp_path, capsys) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sweep_and_prune_with_reconstruction(run_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["sweep", str(run_dir), "--sparsities", "0,0.9", "--reconstruct"]
    assert main([*args, "--calibration-size", "128", "--tag", "recon"]) == 0
    result = json.loads((run_dir / "sweep-recon.json").read_text())
    sweep = result["config"]["sweep"]
    assert sweep["reconstruct"] is True and sweep["calibration_size"] == 128
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert "seconds" in capsys.readouterr().out
    out = tmp_path / "recon.pt"
    assert main(["prune", str(run_dir), "--sparsity", "0.9", "--reconstruct",
                 "--criterion", "wanda", "--calibration-size", "128", "--out", str(out)]) == 0  # fmt: skip
    assert "90% sparsity" in capsys.readouterr().out and out.is_file()
    gradual = tmp_path / "gradual.pt"
    assert main(["prune", str(run_dir), "--sparsity", "0.9", "--reconstruct", "--gradual",
                 "--gradual-step", "0.5", "--calibration-size", "128", "--out", str(gradual)]) == 0  # fmt: skip
    assert "90% sparsity" in capsys.readouterr().out and gradual.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep", "--reconstruct", "--calibration-size", "0"], "Invalid calibration_size: 0"),
        (["prune", "--sparsity", "0.5", "--gradual"], "Invalid gradual: True"),
        (["prune", "--sparsity", "0.5", "--reconstruct", "--gradual", "--gradual-step", "2"],
         "Invalid gradual_step: 2.0"),
        (["prune", "--sparsity", "0.5", "--reconstruct", "--calibration-size", "-3"],
         "Invalid calibration_size: -3"),
        (["prune", "--sparsity", "0.5", "--criterion", "taylor"], "Invalid criterion: 'taylor'"),
    ],
)  # fmt: skip
def test_reconstruction_flags_refuse_bad_values(run_dir, tmp_path, capsys, args, message) -> None:
    command, *rest = args
    out = ["--out", str(tmp_path / "x.pt")] if command == "prune" else []
    before = sorted(p.name for p in run_dir.iterdir())
    assert main([command, str(run_dir), *rest, *out]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert not (tmp_path / "x.pt").exists()
