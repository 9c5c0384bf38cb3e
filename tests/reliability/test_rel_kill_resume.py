"""A training run killed with SIGKILL in the middle of an epoch and restarted with ``--resume``
ends with exactly the weights of an uninterrupted run (CPU, same seed, one thread)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfwprune import _io
from sfwprune.cli import main
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import (
    METRICS_FILE,
    SUMMARY_FILE,
    load_checkpoint,
    read_config,
    train_run,
)

EPOCHS = 10  # killed early; epoch 1 (JIT warm-up) is ~8x slower than the next ones, so the
# sleep of 0.4 x epoch 1 overshoots a few epochs: 10 leave room on any machine
# 128 steps of batch 8 on 8x8 synthetic images: about half a second per epoch on one thread.
FLAGS = [
    "--dataset", "synthetic", "--model", "lenet300", "--epochs", str(EPOCHS), "--batch-size", "8",
    "--limit", "1024", "--schedule", "cosine", "--seed", "5",
]  # fmt: skip


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sfwprune", "--threads", "1", "--quiet", "train", *FLAGS,
            "--out", str(out), *extra]  # fmt: skip


def _metric_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / METRICS_FILE).read_text().splitlines()]


def _wait_for_first_epoch(proc: subprocess.Popen, run: Path, timeout: float = 120.0) -> dict:
    """The first metrics row, once written (the checkpoint of epoch 1 is on disk before it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "child exited"
        path = run / METRICS_FILE
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and lines[0].endswith("}"):
                return json.loads(lines[0])
        time.sleep(0.02)
    raise AssertionError("no epoch finished in time")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, child_env) -> None:
    # The run to kill: a real `python -m sfwprune train` process.
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(run), env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        first = _wait_for_first_epoch(proc, run)
        # a fraction of an epoch later: in the middle of epoch 2's steps
        time.sleep(0.4 * first["epoch_seconds"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run)["epoch"]
    assert 1 <= killed_at < EPOCHS, "the kill must interrupt the run"
    assert not (run / SUMMARY_FILE).exists()

    # Restart with --resume (the CLI, in this process: one thread, like the child).
    assert main(["--threads", "1", "--quiet", "train", *FLAGS, "--out", str(run), "--resume"]) == 0
    assert (run / SUMMARY_FILE).is_file()

    # The uninterrupted run, in this process (one thread, as the children), same config.
    cfg = read_config(run)
    assert cfg == TrainConfig.from_dict(cfg.to_dict())  # plain values: nothing lost in the JSON
    reference = train_run(cfg, tmp_path / "reference", quiet=True)

    final = load_checkpoint(run)
    assert final["epoch"] == EPOCHS
    expected = reference.model.state_dict()
    assert list(final["model"]) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(final["model"][name], tensor), name

    rows = _metric_lines(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # one line per epoch
    ref_rows = _metric_lines(tmp_path / "reference")
    for got, want in zip(rows, ref_rows, strict=True):
        for key in ("train_loss", "train_accuracy", "test_accuracy", "test_loss", "lr"):
            assert got[key] == want[key], (got["epoch"], key)


def test_kill_between_checkpoint_and_metrics_line_loses_nothing(tmp_path, monkeypatch) -> None:
    cfg = TrainConfig(dataset="synthetic", model="lenet300", epochs=3, limit=128, batch_size=64)
    run = tmp_path / "run"
    real_append = _io.append_line
    calls = {"n": 0}

    def dies_at_second_epoch(path, line):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2's checkpoint is on disk, its metrics line is not
            raise KeyboardInterrupt
        real_append(path, line)

    monkeypatch.setattr(_io, "append_line", dies_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, quiet=True)
    monkeypatch.setattr(_io, "append_line", real_append)
    train_run(cfg, run, resume=True, quiet=True)
    assert [r["epoch"] for r in _metric_lines(run)] == [1, 2, 3]
