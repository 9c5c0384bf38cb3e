"""`sfwprune prune/sweep --structure`: the smaller model file, 2:4 export, one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from sfwprune.cli import main
from sfwprune.experiments.prune import load_small
from sfwprune.experiments.runner import load_run
from sfwprune.prune import follows_n_m, prune_


@pytest.fixture(scope="module")
def run5(tmp_path_factory):
    run = tmp_path_factory.mktemp("structured") / "run5"
    argv = ["--quiet", "train", "--out", str(run), "--dataset", "synthetic", "--model", "lenet5",
            "--epochs", "1", "--limit", "128", "--optimizer", "sfw", "--constraint", "channel",
            "--k-frac", "0.25"]  # fmt: skip
    assert main(argv) == 0
    return run


def _inputs(run) -> torch.Tensor:
    shape = load_run(run, device="cpu").data.input_shape
    return torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))


def test_channel_file_is_smaller_and_equals_the_masked_model(run5, tmp_path, capsys) -> None:
    out = tmp_path / "small.pt"
    argv = ["prune", str(run5), "--structure", "channel", "--sparsity", "0.5", "--scope",
            "layer", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rebuilt from the file" in text and "CPU latency at batch 1" in text
    payload = torch.load(out, weights_only=True)
    assert {"model", "input_shape", "num_classes", "spec", "state_dict"} <= set(payload)
    assert payload["model"] == "lenet5" and payload["spec"]["features.0"] == [1, 3]
    small = load_small(out)
    masked = load_run(run5, device="cpu").model.eval()
    prune_(masked, 0.5, structure="channel", scope="layer")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    x = _inputs(run5)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    acc = float(text.split("rebuilt from the file: ")[1].split("%")[0])
    assert 0.0 <= acc <= 100.0


def test_two_four_file_with_reconstruction(run5, tmp_path, capsys) -> None:
    out = tmp_path / "nm.pt"
    argv = ["prune", str(run5), "--structure", "2:4", "--indivisible", "skip", "--reconstruct",
            "--calibration-size", "64", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "2:4 pruning at 50%" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["structure"] == "2:4"
    # every weight is in the state dict or in the 2:4 matrices, never both
    assert not set(payload["semi_structured"]) & set(payload["state_dict"])
    model = load_small(out)
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and w[0].numel() % 4 == 0:
            assert follows_n_m(w, 2, 4), name


def test_sweep_structure(run5, capsys) -> None:
    assert main(["sweep", str(run5), "--structure", "channel", "--norm", "1", "--scope", "layer",
                 "--tag", "t-ch"]) == 0  # fmt: skip
    result = json.loads((run5 / "sweep-t-ch.json").read_text())
    assert [r["sparsity"] for r in result["rows"]] == [0.0, 0.25, 0.5, 0.75]
    assert result["config"]["sweep"]["structure"] == "channel"
    assert result["config"]["sweep"]["norm"] == 1
    assert main(["sweep", str(run5), "--structure", "2:4", "--indivisible", "skip",
                 "--tag", "t-nm"]) == 0  # fmt: skip
    rows = json.loads((run5 / "sweep-t-nm.json").read_text())["rows"]
    assert [r["sparsity"] for r in rows] == [0.5] and rows[0]["measured_sparsity"] >= 0.5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--structure", "3:2", "--sparsity", "0.5"], "Invalid structure: '3:2'"),
        (["--structure", "2:4"], "Invalid M: 4 does not divide"),
        (["--structure", "channel", "--sparsity", "1.0"], "Invalid sparsity: 1"),
        (["--structure", "channel", "--sparsity", "0.5", "--norm", "3"], "Invalid norm: 3"),
        (["--structure", "2:4", "--sparsity", "0.9"], "Invalid sparsity: 0.9"),
        (["--structure", "rows", "--sparsity", "0.5"], "Invalid structure: 'rows'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run5, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "bad.pt"
    assert main(["prune", str(run5), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_sweep_bad_structure(run5, capsys) -> None:
    assert main(["sweep", str(run5), "--structure", "channel", "--sparsities", "0.5,1"]) == 2
    assert "Invalid sparsity: 1.0" in capsys.readouterr().err
    assert main(["sweep", str(run5), "--norm", "1"]) == 2
    assert "for --structure only" in capsys.readouterr().err


def test_model_the_shrinker_cannot_handle(run5, tmp_path, capsys, monkeypatch) -> None:
    from sfwprune.prune import structured

    def refuse(model):
        raise ValueError(f"Invalid model: {type(model).__name__} (not supported)")

    monkeypatch.setattr(structured, "channel_spaces", refuse)
    out = tmp_path / "small.pt"
    argv = ["prune", str(run5), "--structure", "channel", "--sparsity", "0.5", "--out", str(out)]
    assert main(argv) == 2
    assert "Invalid model: LeNet5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_load_small_refuses_other_files(tmp_path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="Invalid structured file"):
        load_small(path)
