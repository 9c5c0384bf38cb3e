"""Issue 16, CLI/runner cases: nothing overwritten, nothing silently substituted.

Each test drives the CLI (``sfwprune.cli.main``, what ``python -m sfwprune`` runs; the cases
about another process -- lock, SIGTERM, the worst overwrite -- run it in a real subprocess) and
checks the exit code, the one-line message and that no file changed that should not have.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfwprune.cli import main
from sfwprune.data import resolve_source
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import CHECKPOINT_FILE, train_run

from .conftest import TINY

TRAIN = ["--quiet", "train", "--dataset", "synthetic", "--model", "lenet300", "--limit", "128",
         "--batch-size", "64"]  # fmt: skip


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, needle: str, *argv: str) -> str:
    """Run the CLI, expect exit 2 with one line containing ``needle``; return the line."""
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def child(env, *argv: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sfwprune", "--threads", "1", *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def partial_run(out: Path, epochs: int = 3, stop: int = 1) -> Path:
    """A run of ``epochs`` epochs stopped after epoch ``stop`` (checkpoint, no summary)."""
    train_run(TrainConfig(**{**TINY, "epochs": epochs}), out, quiet=True, stop_after_epoch=stop)
    return out


# case 1: an output file never lands on a run's own files ------------------------------------


def test_prune_out_onto_the_runs_checkpoint_is_refused(run_copy, child_env, listing) -> None:
    before = listing(run_copy)
    proc = child(child_env, "prune", run_copy, "--sparsity", "0.9", "--out",
                 run_copy / CHECKPOINT_FILE)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sfwprune: error: Invalid --out:")
    assert "it is checkpoint.pt of the run" in proc.stderr
    assert listing(run_copy) == before


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "summary.json", "sweep.json"])
def test_prune_and_plot_out_onto_run_files_are_refused(run_copy, capsys, listing, name) -> None:
    before = listing(run_copy)
    refused(capsys, f"it is {name} of the run", "prune", run_copy, "--sparsity", "0.5",
            "--out", run_copy / name)  # fmt: skip
    refused(capsys, f"it is {name} of the run", "plot", run_copy, "--weights", "--out",
            run_copy / name)  # fmt: skip
    assert listing(run_copy) == before


def test_prune_out_through_a_symlink_onto_the_checkpoint_is_refused(run_copy, capsys) -> None:
    link = run_copy.parent / "model.pt"
    link.symlink_to(run_copy / CHECKPOINT_FILE)
    data = (run_copy / CHECKPOINT_FILE).read_bytes()
    refused(capsys, "it is checkpoint.pt of the run", "prune", run_copy, "--sparsity", "0.5",
            "--out", link)  # fmt: skip
    assert (run_copy / CHECKPOINT_FILE).read_bytes() == data


# case 2: the data recorded and checked --------------------------------------------------------


def test_data_source_is_recorded_and_checked_by_sweep_and_prune(run_copy, capsys) -> None:
    record = json.loads((run_copy / "config.json").read_text())
    assert record["data_source"] == resolve_source("synthetic").as_dict()
    record["data_source"]["sha256"] = "0" * 64  # as if trained on other data
    (run_copy / "config.json").write_text(json.dumps(record))
    refused(capsys, "Invalid data source", "sweep", run_copy)
    refused(capsys, "Invalid data source", "prune", run_copy, "--sparsity", "0.5", "--out",
            run_copy.parent / "p.pt")  # fmt: skip
    assert not (run_copy / "sweep.json").exists() and not (run_copy.parent / "p.pt").exists()


def test_missing_data_dir_is_an_error_and_makes_no_folder(tmp_path, capsys) -> None:
    out = tmp_path / "new"
    refused(capsys, "Invalid data_dir: '/does-not-exist'", *TRAIN, "--dataset", "fashion-mnist",
            "--data-dir", "/does-not-exist", "--out", out)  # fmt: skip
    assert not out.exists()


# cases 4, 11, 14: a run being written by another process ------------------------------------


def _wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {rows} rows in {path} after {timeout}s")


def test_lock_refuses_a_second_writer_and_sigterm_stops_cleanly(tmp_path, capsys, child_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sfwprune", "--threads", "1", *TRAIN, "--epochs", "100000",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_rows(out / "metrics.jsonl", 1, proc)
        # case 4: a second writer, with or without --resume, is refused while the first runs
        refused(capsys, "another sfwprune process is training in it", *TRAIN, "--epochs",
                "100000", "--resume", "--out", out)  # fmt: skip
        refused(capsys, "another sfwprune process", *TRAIN, "--epochs", "100000", "--out", out)
        # case 14: evaluating a run that is still training is refused unless asked for
        refused(capsys, "a training process is still writing it", "sweep", out)
        refused(capsys, "--allow-partial", "prune", out, "--sparsity", "0.5", "--out",
                tmp_path / "p.pt")  # fmt: skip
        code, printed, err = cli(capsys, "sweep", out, "--sparsities", "0,0.5", "--allow-partial")
        assert code == 0, err
        swept = json.loads((out / "sweep.json").read_text())["run"]
        assert swept["finished"] is False and swept["epoch"] >= 1
        assert f"epoch-{swept['epoch']} checkpoint" in printed
        # case 11: SIGTERM stops like Ctrl-C
        _wait_for_rows(out / "metrics.jsonl", swept["epoch"] + 2, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert err.decode().strip().splitlines()[-1] == "sfwprune: terminated (SIGTERM)"
    assert not list(out.glob(".*.tmp")), os.listdir(out)
    # the lock is free again: the run resumes (here to a shorter end: same config required)
    refused(capsys, "made with another config", *TRAIN, "--epochs", "3", "--resume", "--out", out)


def test_killed_writers_temp_files_are_removed_on_resume(tmp_path, capsys) -> None:
    run = partial_run(tmp_path / "run")
    stale = run / ".checkpoint.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, _, err = cli(capsys, *TRAIN, "--epochs", "3", "--resume", "--out", run)
    assert code == 0, err
    assert not stale.exists()


# case 5: never the current folder or a folder of other files --------------------------------


def test_out_empty_string_current_folder_and_non_run_folder_are_refused(
    tmp_path, capsys, monkeypatch, listing
) -> None:
    refused(capsys, "Invalid path: ''", *TRAIN, "--out", "")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text('{"my": "settings"}')
    (user / "summary.json").write_text("{}")
    before = listing(user)
    monkeypatch.chdir(user)
    refused(capsys, "(the current folder;", *TRAIN, "--out", ".")
    monkeypatch.chdir(tmp_path)
    refused(capsys, "not empty and not an sfwprune run", *TRAIN, "--out", user)
    assert listing(user) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    refused(capsys, "(the current folder;", *TRAIN, "--out", ".")
    assert not list(empty.iterdir())


# case 7: the checkpoint belongs to config.json -----------------------------------------------


def test_edited_config_or_foreign_checkpoint_is_refused(run_copy, tmp_path, capsys) -> None:
    record = json.loads((run_copy / "config.json").read_text())
    record["config"]["seed"] = 5
    (run_copy / "config.json").write_text(json.dumps(record))
    refused(capsys, "checkpoint.pt was made with another config than config.json", "sweep",
            run_copy)  # fmt: skip
    record["config"]["seed"] = TINY.get("seed", 0)
    (run_copy / "config.json").write_text(json.dumps(record))
    other = tmp_path / "other"
    train_run(TrainConfig(**TINY), other, quiet=True)  # same config, another training
    shutil.copy(other / CHECKPOINT_FILE, run_copy / CHECKPOINT_FILE)
    refused(capsys, "checkpoint.pt belongs to another run", "sweep", run_copy)
    refused(capsys, "checkpoint.pt belongs to another run", "prune", run_copy, "--sparsity",
            "0.5", "--out", tmp_path / "p.pt")  # fmt: skip


# case 8: --resume never starts over ------------------------------------------------------------


def test_resume_of_a_missing_run_or_checkpoint_is_refused(run_copy, tmp_path, capsys) -> None:
    typo = tmp_path / "typo"
    refused(capsys, "Invalid --resume: no run in", *TRAIN, "--resume", "--out", typo)
    assert not typo.exists()
    (run_copy / CHECKPOINT_FILE).unlink()
    metrics = (run_copy / "metrics.jsonl").read_bytes()
    refused(capsys, "has no checkpoint.pt (nothing to resume", *TRAIN, "--epochs", "1",
            "--resume", "--out", run_copy)  # fmt: skip
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics


# case 10: one line, exit 2 ---------------------------------------------------------------------


def test_more_bad_inputs_are_one_line(tmp_path, capsys, run_copy, monkeypatch) -> None:
    refused(capsys, "Invalid device: 'cuda:abc'", *TRAIN, "--device", "cuda:abc", "--out",
            tmp_path / "d")  # fmt: skip
    for body, needle in (('{"config": null}', "Invalid config key: 'config'"),
                         ('{"device": 5}', "Invalid device: 5")):  # fmt: skip
        (tmp_path / "c.json").write_text(body)
        refused(capsys, needle, *TRAIN, "--config", tmp_path / "c.json", "--out", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    # a sweep row without accuracy
    (run_copy / "sweep.json").write_text(json.dumps({"rows": [{"sparsity": 0.5}]}))
    refused(capsys, "row 0 has no numeric 'accuracy'", "plot", run_copy, "--out",
            tmp_path / "f.png")  # fmt: skip
    # a junk reproduce_config.json with --report-only: one line, and no docs/ made
    grid = tmp_path / "grid" / "lenet300"
    grid.mkdir(parents=True)
    (grid / "reproduce_config.json").write_text('["junk"]')
    monkeypatch.chdir(tmp_path)
    refused(capsys, "Invalid reproduce config", "reproduce", "fashion-mnist", "--report-only",
            "--out", tmp_path / "grid")  # fmt: skip
    assert not (tmp_path / "docs").exists() and not (tmp_path / "RESULTS.md").exists()


# cases 12, 13: stale sweeps, torn metrics -------------------------------------------------------


def test_retraining_removes_stale_sweeps_and_plot_refuses_foreign_ones(
    run_copy, tmp_path, capsys
) -> None:
    assert cli(capsys, "sweep", run_copy, "--sparsities", "0,0.5")[0] == 0
    assert cli(capsys, "sweep", run_copy, "--sparsities", "0,0.5", "--tag", "t")[0] == 0
    old = (run_copy / "sweep.json").read_text()
    (run_copy / CHECKPOINT_FILE).unlink()  # the user retrains in the same folder
    code, _, err = cli(capsys, *TRAIN, "--epochs", "1", "--seed", "4", "--out", run_copy)
    assert code == 0, err
    assert not list(run_copy.glob("sweep*")), os.listdir(run_copy)
    (run_copy / "sweep.json").write_text(old)  # an old sweep put back by hand
    refused(capsys, "made from an earlier training in this folder", "plot", run_copy, "--out",
            tmp_path / "f.png")  # fmt: skip


def test_torn_blank_and_junk_metrics_lines_keep_later_rows_on_resume(tmp_path, capsys) -> None:
    run = partial_run(tmp_path / "run", epochs=3, stop=2)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    torn = "\n".join(["", '{"epoch": 1, "train_lo', rows[0], "[1, 2]", "", rows[1]]) + "\n"
    (run / "metrics.jsonl").write_text(torn)
    code, out, err = cli(capsys, *TRAIN, "--epochs", "3", "--resume", "--out", run)
    assert code == 0, err
    assert out.strip().endswith("after 3 epochs")
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 3


# case 14: an unfinished (stopped) run ----------------------------------------------------------


def test_unfinished_run_is_refused_unless_allow_partial(tmp_path, capsys) -> None:
    run = partial_run(tmp_path / "run", epochs=3, stop=1)
    refused(capsys, "its training did not finish (no summary.json)", "sweep", run)
    code, out, err = cli(capsys, "prune", run, "--sparsity", "0.5", "--out", tmp_path / "p.pt",
                         "--allow-partial")  # fmt: skip
    assert code == 0, err
    assert "weights of epoch 1)" in out


# case 16: smaller ones -------------------------------------------------------------------------


def test_tag_dangling_symlink_and_seed_are_one_line(run_copy, tmp_path, capsys, listing) -> None:
    before = listing(tmp_path)
    refused(capsys, "Invalid tag: '../x'", "sweep", run_copy, "--tag", "../x")
    refused(capsys, "Invalid tag: '../x'", "plot", run_copy, "--tag", "../x", "--out",
            tmp_path / "f.png")  # fmt: skip
    assert listing(tmp_path) == before
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere" / "x")
    refused(capsys, "(a symlink to", *TRAIN, "--out", link)
    assert not (tmp_path / "nowhere").exists()
    big = str(2**64)
    refused(capsys, f"Invalid seed: {big} (expected an integer in [0, 4294967295])", *TRAIN,
            "--seed", big, "--out", tmp_path / "s")  # fmt: skip
    refused(capsys, f"Invalid seed: {big} (expected an integer in [0, 4294967295])", "sweep",
            run_copy, "--seed", big)  # fmt: skip


def test_prune_reports_the_accuracy_of_the_stored_dtype(run_copy, tmp_path, capsys) -> None:
    from sfwprune.experiments.runner import load_trained, test_loader
    from sfwprune.prune import load_pruned
    from sfwprune.train import evaluate

    out = tmp_path / "p.pt"
    code, printed, err = cli(capsys, "prune", run_copy, "--sparsity", "0.3", "--dtype",
                             "bfloat16", "--out", out)  # fmt: skip
    assert code == 0, err
    cfg, model, data = load_trained(run_copy, device="cpu")
    load_pruned(out, model)
    assert all(
        torch.equal(p, p.to(torch.bfloat16).float()) for p in model.parameters()
    )  # what is evaluated is what bf16 can hold
    acc = evaluate(model, test_loader(cfg, data, torch.device("cpu")))["accuracy"]
    assert f"{acc:.2f}% (bfloat16 weights of epoch 1)" in printed
