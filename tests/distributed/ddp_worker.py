"""One rank of the distributed tests; started by test_ddp.py under torchrun (2 CPU processes).

    python -m torch.distributed.run --nproc-per-node=2 ... ddp_worker.py OUT

Writes, per rank r, ``OUT/sfw64-rank{r}.pt`` (weights after float64 SFW steps through DDP) and
``OUT/full-rank{r}.pt`` (weights, buffers and metrics a 2-epoch ``train_run`` returned); and
``OUT/refused-rank{r}.txt`` (the CLI's exit status for a folder holding a run already), and
three runs of one config: ``OUT/full`` (``train_run``), ``OUT/cli`` (``python -m sfwprune
train``, i.e. ``torchrun -m sfwprune train``) and ``OUT/part`` (``train_run`` stopped after
epoch 1, ``OUT/part-epoch1.jsonl`` its metrics then, resumed by ``sfwprune train --resume``).
One launch for everything: on 2 shared cores most of a launch is importing torch.
"""

from __future__ import annotations

import faulthandler
import runpy
import sys
from pathlib import Path

import torch

from sfwprune import _io
from sfwprune.distributed import env_ranks, init_distributed
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import load_data, make_model, train_loader, train_run
from sfwprune.train import build_optimizer, build_scheduler, train_epoch

# lenet300 has no BatchNorm, so the 2-rank gradient is exactly the full-batch one.
SFW64 = TrainConfig(
    dataset="synthetic", model="lenet300", batch_size=16, limit=64, augment=True,
    schedule="cosine", device="cpu", seed=5,
)  # fmt: skip
SFW64_EPOCHS = 2
# The end-to-end run (BatchNorm: buffers are synced to rank 0's before evaluation and saving).
RUN = TrainConfig(
    dataset="synthetic", model="lenet5bn", epochs=2, batch_size=32, limit=128, device="cpu",
    seed=1,
)  # fmt: skip
RUN_ARGS = [
    "--dataset", "synthetic", "--model", "lenet5bn", "--epochs", "2", "--batch-size", "32",
    "--limit", "128", "--device", "cpu", "--seed", "1",
]  # fmt: skip


def sfw64_steps() -> dict[str, torch.Tensor]:
    """Float64 SFW training through the runner's loader and DDP; this process's rank and world
    size (one process when started without torchrun). Returns the final weights."""
    cfg = SFW64
    ctx = init_distributed("cpu")
    data = load_data(cfg)
    model = make_model(cfg, data, ctx.device).double()
    optimizer = build_optimizer(model, cfg.optimizer)
    loader = train_loader(
        cfg, data, ctx.device, rank=ctx.rank, world_size=ctx.world_size, dtype=torch.float64
    )
    scheduler = build_scheduler(optimizer, cfg.schedule, SFW64_EPOCHS * len(loader))
    net = ctx.wrap(model)
    for epoch in range(SFW64_EPOCHS):
        train_epoch(net, loader, optimizer, scheduler, epoch=epoch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cli(*args: str) -> int:
    """``python -m sfwprune ARGS`` in this process (its ``__main__``, as torchrun -m runs it);
    returns the exit status."""
    sys.argv = ["sfwprune", *args]
    try:
        runpy.run_module("sfwprune", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = ["ddp_worker.py"]
    return 0


def main(out: Path) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where, then ends
    torch.set_num_threads(1)
    rank = env_ranks()[0]
    _io.atomic_torch_save(sfw64_steps(), out / f"sfw64-rank{rank}.pt")
    result = train_run(RUN, out / "full", quiet=True)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    rows = [{k: v for k, v in m.items() if "seconds" not in k} for m in result.metrics]
    _io.atomic_torch_save({"model": state, "metrics": rows}, out / f"full-rank{rank}.pt")
    # Not --quiet: rank 0 alone shows progress bars, which must not change its data order.
    assert cli("--threads", "1", "train", *RUN_ARGS, "--out", str(out / "cli")) == 0
    # A run folder in use: rank 0 finds it, and every rank must stop with the same error.
    status = cli("--quiet", "train", *RUN_ARGS, "--out", str(out / "full"))
    _io.atomic_write_text(out / f"refused-rank{rank}.txt", str(status))
    train_run(RUN, out / "part", quiet=True, stop_after_epoch=1)
    if rank == 0:  # the files are complete: train_run's ranks wait for rank 0's writes
        epoch1 = (out / "part" / "metrics.jsonl").read_text()
        _io.atomic_write_text(out / "part-epoch1.jsonl", epoch1)
    assert cli("--quiet", "--threads", "1", "train", "--resume", "--out", str(out / "part")) == 0


if __name__ == "__main__":
    main(Path(sys.argv[1]))
