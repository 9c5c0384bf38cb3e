"""Data-parallel training on 2 CPU processes (gloo) started by torchrun, loopback only.

One launch of ``ddp_worker.py`` for the whole module (float64 SFW steps through DDP; a 2-epoch
run by ``train_run`` and by the CLI's ``__main__``; a run stopped after epoch 1 and resumed by
``sfwprune train --resume``). One-process references are computed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sfwprune.experiments import runner
from sfwprune.train import build_optimizer, evaluate

WORKER = Path(__file__).with_name("ddp_worker.py")
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", ".lock"}  # flock
pytestmark = pytest.mark.slow


def _worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(*args: str) -> tuple[str, str]:
    """``torchrun --nproc-per-node=2 ARGS`` on a free loopback port; returns stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"{stdout[-4000:]}\n{stderr[-4000:]}"
    return stdout, stderr


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    printed, stderr = _torchrun(str(WORKER), str(out))
    return {"out": out, "printed": printed, "stderr": stderr}


def test_sfw_steps_identical_on_ranks_and_equal_to_one_process(launched, monkeypatch) -> None:
    out = launched["out"]
    ranks = [_load(out / f"sfw64-rank{r}.pt") for r in (0, 1)]
    for name, value in ranks[0].items():
        assert value.dtype == torch.float64
        assert torch.equal(value, ranks[1][name]), name  # bit-identical: same averaged gradient
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    worker = _worker_module()
    single = worker.sfw64_steps()  # one process, batch 16 = the 2 ranks' 8 + 8
    cfg = worker.SFW64
    start = runner.make_model(cfg, runner.load_data(cfg), torch.device("cpu")).double()
    build_optimizer(start, cfg.optimizer)  # the shift inside the sets, as in training
    moved = 0.0
    for name, value in single.items():
        assert (ranks[0][name] - value).abs().max().item() <= 1e-6, name
        moved = max(moved, (value - start.state_dict()[name]).abs().max().item())
    assert moved > 1e-2  # the steps did move the weights


def test_run_on_two_ranks_writes_once_and_ranks_agree(launched) -> None:
    out = launched["out"]
    run = out / "full"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert [r["epoch"] for r in _rows(run)] == [1, 2]
    prov = json.loads((run / "config.json").read_text())["provenance"]
    assert (prov["world_size"], prov["backend"]) == (2, "gloo")
    ranks = [_load(out / f"full-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == _no_time(_rows(run))
    ckpt = _load(run / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["loader"]["world_size"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"])
    for name, value in ckpt["model"].items():  # weights and BatchNorm statistics
        assert torch.equal(value, ranks[0]["model"][name]), name
        assert torch.equal(value, ranks[1]["model"][name]), name


def test_reduced_test_metrics_are_the_whole_test_set(launched) -> None:
    run = launched["out"] / "full"
    worker = _worker_module()
    cfg, device = worker.RUN, torch.device("cpu")
    data = runner.load_data(cfg)
    model = runner.make_model(cfg, data, device)
    model.load_state_dict(_load(run / "checkpoint.pt")["model"])
    whole = evaluate(model, runner.test_loader(cfg, data, device))
    last = _rows(run)[-1]
    assert last["test_accuracy"] == pytest.approx(whole["accuracy"], abs=1e-9)
    assert last["test_loss"] == pytest.approx(whole["loss"], rel=1e-5)


def _same_checkpoints(a: dict, b: dict) -> None:
    for name, value in b["model"].items():
        assert torch.equal(a["model"][name], value), name
    la, lb = dict(a["loader"]), dict(b["loader"])
    assert torch.equal(la.pop("generator"), lb.pop("generator")) and la == lb


def test_cli_under_torchrun_writes_the_run_once(launched) -> None:
    out = launched["out"]
    run = out / "cli"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert [r["epoch"] for r in _rows(run)] == [1, 2]  # one line per epoch: rank 0 alone
    assert _no_time(_rows(run)) == _no_time(_rows(out / "full"))
    _same_checkpoints(_load(run / "checkpoint.pt"), _load(out / "full" / "checkpoint.pt"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["provenance"]["world_size"] == 2


def test_error_on_rank_0_stops_every_rank(launched) -> None:
    out = launched["out"]  # "full" holds a run: rank 0 refuses it, rank 1 gets its error
    assert [(out / f"refused-rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
    assert "holds a run already" in launched["stderr"]


def test_cli_resume_under_torchrun_continues_exactly(launched) -> None:
    out = launched["out"]
    part, full = out / "part", out / "full"
    assert {p.name for p in part.iterdir()} == RUN_FILES
    text = (part / "metrics.jsonl").read_text()
    assert text.startswith((out / "part-epoch1.jsonl").read_text())  # epoch 1 kept as it was
    assert [r["epoch"] for r in _rows(part)] == [1, 2]
    assert _no_time(_rows(part)) == _no_time(_rows(full))
    _same_checkpoints(_load(part / "checkpoint.pt"), _load(full / "checkpoint.pt"))
    assert "test accuracy" in launched["printed"]
