"""Training runs on disk: ``RUN_DIR/{config.json, metrics.jsonl, checkpoint.pt, summary.json}``.

A checkpoint is written atomically at the end of every epoch and holds everything a resumed run
needs to continue exactly: model, optimizer, schedule, data-order and RNG states, epoch.

Under ``torchrun`` (see :mod:`sfwprune.distributed` and docs/scaling.md) ``batch_size`` stays the
global batch, split evenly over the ranks; rank 0 alone writes the files, and metrics are sums
over all ranks, so a run's files look the same whatever the number of processes.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _io
from ..data import Dataset, DeviceLoader, load_dataset
from ..distributed import DistContext, init_distributed, local_batch_size
from ..models import build_model
from ..train import build_optimizer, build_scheduler, evaluate, fit
from .config import TrainConfig
from .provenance import provenance

CHECKPOINT_FORMAT = 1
CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE = (
    "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json",
)  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r} (CUDA is not available here; use cpu or auto)")
    return device


def load_data(cfg: TrainConfig) -> Dataset:
    return load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit, image_size=cfg.image_size
    )


def make_model(cfg: TrainConfig, data: Dataset, device: torch.device) -> nn.Module:
    model = build_model(
        cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=cfg.seed
    )
    return model.to(device)


def train_loader(
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device,
    *,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    **kw: Any,
) -> DeviceLoader:
    """The shuffled training loader; with ``world_size`` ranks, rank ``rank``'s shard of every
    epoch with ``cfg.batch_size / world_size`` samples per batch (the global batch is kept)."""
    return DeviceLoader.from_dataset(
        data, "train", batch_size=local_batch_size(cfg.batch_size, world_size), shuffle=True,
        augment=cfg.use_augment, device=device, drop_last=False,
        generator=cfg.seed if seed is None else seed, rank=rank, world_size=world_size, **kw,
    )  # fmt: skip


def test_loader(cfg: TrainConfig, data: Dataset, device: torch.device, **kw: Any) -> DeviceLoader:
    return DeviceLoader.from_dataset(
        data, "test", batch_size=cfg.eval_batch_size, shuffle=False, device=device, **kw
    )


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    # .cpu(): a checkpoint loaded with map_location=cuda holds CUDA tensors, and generator
    # states must be CPU ByteTensors.
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def read_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Invalid run folder: {str(run_dir)!r} (no {CONFIG_FILE}; train a run there first)"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        stored = values["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"Invalid run config: {str(path)!r} (not an sfwprune config.json: {type(exc).__name__})"
        ) from None
    return TrainConfig.from_dict(stored)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    return rows


def load_checkpoint(run_dir: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The run's checkpoint, loaded with ``weights_only=True``; clear errors when unusable."""
    path = Path(run_dir) / CHECKPOINT_FILE
    ckpt = _io.safe_torch_load(path, map_location=device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise ValueError(f"Invalid checkpoint: {str(path)!r} (not an sfwprune checkpoint)")
    return ckpt


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"Invalid checkpoint: {source!r} does not fit this model "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None


def load_trained(run_dir: str | Path, device: torch.device | str | None = None):
    """``(config, model, data)`` of a finished (or checkpointed) run, weights loaded."""
    cfg = read_config(run_dir)
    device = resolve_device(cfg.device if device is None else str(device))
    data = load_data(cfg)
    model = make_model(cfg, data, device)
    ckpt = load_checkpoint(run_dir, device)
    load_model_state(model, ckpt["model"], str(Path(run_dir) / CHECKPOINT_FILE))
    return cfg, model, data


@dataclass
class RunResult:
    config: TrainConfig
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module


def _prepare_folder(out: Path, resume: bool) -> bool:
    """Create ``out``; return whether a checkpoint is there to resume from."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"Invalid output folder: {str(out)!r} ({exc.strerror})") from None
    has_ckpt = (out / CHECKPOINT_FILE).is_file()
    if has_ckpt and not resume:
        raise ValueError(
            f"Invalid output folder: {str(out)!r} (it holds a run already; pass --resume to "
            "continue it or choose another --out)"
        )
    probe = out / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"Invalid output folder: {str(out)!r} (not writable: {exc.strerror})"
        ) from None
    return has_ckpt


def train_run(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its checkpoint exactly.

    ``stop_after_epoch`` ends the run early after that epoch (for tests of interruption).
    Started by ``torchrun`` (or inside a process group the caller set up) it trains
    data-parallel (:mod:`sfwprune.distributed`): rank 0 writes the files and logs, and every
    rank returns the same metrics and weights.
    """
    cfg.validate()
    ctx = init_distributed(cfg.device)
    return _train_run(
        ctx, cfg, Path(out_dir), resume=resume, quiet=quiet or not ctx.is_main, log=log,
        stop_after_epoch=stop_after_epoch,
    )  # fmt: skip


def _train_run(
    ctx: DistContext,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool,
    quiet: bool,
    log: Callable[[str], None],
    stop_after_epoch: int | None,
) -> RunResult:
    start = time.perf_counter()
    device = ctx.device
    # Data first: a missing dataset must fail before the run folder exists.
    data = ctx.main_first(lambda: load_data(cfg))  # rank 0 first: it may fill a cache
    resuming = ctx.main_only(lambda: _check_folder(cfg, out, resume))
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data, device)
    channels_last = use_channels_last(model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The optimizer on the plain model, before DDP wraps it: the sets are sized from the same
    # seeded initialization on every rank, and DDP then broadcasts rank 0's weights anyway.
    optimizer = build_optimizer(model, cfg.optimizer)
    shard = {"rank": ctx.rank, "world_size": ctx.world_size, "channels_last": channels_last}
    loader = train_loader(cfg, data, device, **shard)
    evaluator = test_loader(cfg, data, device, **shard)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.epochs * len(loader))
    init_info: dict[str, Any] | None = None
    start_epoch = 0
    metrics: list[dict[str, Any]] = []
    if resuming:
        ckpt = load_checkpoint(out, device)  # every rank reads it (weights_only=True)
        load_model_state(model, ckpt["model"], str(out / CHECKPOINT_FILE))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        loader.load_state_dict(_local_loader_state(ckpt["loader"], loader, cfg))
        _set_rng_state(ckpt["rng"], device)
        start_epoch = int(ckpt["epoch"])
        init_info = ckpt.get("sfw_init")
        metrics = ctx.main_only(lambda: _truncate_metrics(out, start_epoch))
        if not quiet:
            log(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs}")
            saved_world = int(ckpt.get("world_size", 1))
            if saved_world != ctx.world_size:
                log(f"note: checkpoint made with {saved_world} processes, resuming with "
                    f"{ctx.world_size}: same data order, different rounding")  # fmt: skip
    else:
        if cfg.sfw_init:
            # Every rank runs the same SFW-Init on the same (unsharded) batches.
            init_info = _run_sfw_init(cfg, data, model, optimizer, device, channels_last)
            if not quiet:
                log(f"SFW-Init: {init_info['iters']} iterations in {init_info['seconds']:.1f}s")
        ctx.main_only(lambda: _write_start_files(out, cfg, ctx))
    net = ctx.wrap(model)

    elapsed = metrics[-1]["elapsed_seconds"] if metrics else 0.0
    t0 = 0.0

    def on_epoch_start(epoch: int) -> None:
        nonlocal t0
        t0 = time.perf_counter()

    def after_train(epoch: int, row: dict[str, Any]) -> dict[str, Any]:
        local = {k: v for k, v in row.items() if k != "epoch"}
        row = {"epoch": row["epoch"], **ctx.mean(local, loader.num_samples)}  # all ranks' samples
        ctx.sync_buffers_(model)  # rank 0's BN statistics: the ones the checkpoint holds
        return row

    def on_epoch_end(epoch: int, row: dict[str, Any]) -> bool:
        nonlocal elapsed
        row["epoch_seconds"] = time.perf_counter() - t0
        elapsed += row["epoch_seconds"]
        row["elapsed_seconds"] = elapsed
        metrics.append(row)
        ckpt = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loader": _global_loader_state(loader, cfg), "rng": _rng_state(device),
            "config": cfg.to_dict(), "sfw_init": init_info, "world_size": ctx.world_size,
        }  # fmt: skip
        ctx.main_only(functools.partial(_write_epoch, out, ckpt, row))  # the others wait
        if not quiet:
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"test acc {row['test_accuracy']:.2f}%  ({row['epoch_seconds']:.1f}s)"
            )
        return stop_after_epoch is not None and epoch + 1 >= stop_after_epoch

    if start_epoch < cfg.epochs:
        fit(
            net, loader, optimizer, epochs=cfg.epochs, scheduler=scheduler,
            precision=cfg.precision, label_smoothing=cfg.label_smoothing,
            start_epoch=start_epoch, on_epoch_start=on_epoch_start,
            epoch_batches=None if quiet else functools.partial(_progress, cfg),
            after_train=after_train,
            evaluate_fn=lambda: _evaluate(ctx, model, evaluator, cfg.precision),
            on_epoch_end=on_epoch_end,
        )  # fmt: skip
    summary = {
        "config": cfg.to_dict(),
        "provenance": _provenance(ctx, wall_seconds=time.perf_counter() - start),
        "epochs_done": len(metrics),
        "train_seconds": metrics[-1]["elapsed_seconds"] if metrics else 0.0,
        "final": metrics[-1] if metrics else None,
        "sfw_init": init_info,
    }
    if len(metrics) == cfg.epochs:
        ctx.main_only(lambda: _io.atomic_write_json(out / SUMMARY_FILE, summary))
    return RunResult(cfg, metrics, summary, model)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether to run ``model`` in ``channels_last``: on CUDA, for models with 2-d convolutions
    (tensor cores read NHWC; an MLP gains nothing)."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _check_folder(cfg: TrainConfig, out: Path, resume: bool) -> bool:
    """Rank 0: prepare ``out``; with a checkpoint there, check it was made with ``cfg``."""
    resuming = _prepare_folder(out, resume)
    if resuming:
        stored = read_config(out)
        if stored != cfg:
            diff = {
                k: (v, getattr(cfg, k)) for k, v in stored.to_dict().items() if getattr(cfg, k) != v
            }
            raise ValueError(
                f"Invalid --resume: the run in {str(out)!r} was made with another config "
                f"(stored vs given: {diff})"
            )
    return resuming


def _provenance(ctx: DistContext, **kw: Any) -> dict[str, Any]:
    return {**provenance(ctx.device, **kw), **ctx.describe()}


def _write_start_files(out: Path, cfg: TrainConfig, ctx: DistContext) -> None:
    _io.atomic_write_json(
        out / CONFIG_FILE, {"config": cfg.to_dict(), "provenance": _provenance(ctx)}
    )
    _io.atomic_write_text(out / METRICS_FILE, "")


def _truncate_metrics(out: Path, epochs: int) -> list[dict[str, Any]]:
    """The metrics rows of the first ``epochs`` epochs, rewritten as the file's whole content."""
    metrics = read_metrics(out)[:epochs]
    _io.atomic_write_text(out / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
    return metrics


def _write_epoch(out: Path, ckpt: dict[str, Any], row: dict[str, Any]) -> None:
    # The metrics line first: a kill between the two leaves a line past the checkpoint, which
    # --resume drops (it keeps the lines of the checkpoint's epochs), never a missing line.
    _io.append_line(out / METRICS_FILE, json.dumps(row))
    _io.atomic_torch_save(ckpt, out / CHECKPOINT_FILE)


def _global_loader_state(loader: DeviceLoader, cfg: TrainConfig) -> dict[str, Any]:
    """The loader's state as one process holds it (global batch, no shard): ranks share the
    generator, and batch ``b`` of a shard is its part of global batch ``b``."""
    return {**loader.state_dict(), "world_size": 1, "batch_size": cfg.batch_size}


def _local_loader_state(
    state: dict[str, Any], loader: DeviceLoader, cfg: TrainConfig
) -> dict[str, Any]:
    if state.get("world_size") == 1 and state.get("batch_size") == cfg.batch_size:
        return {**state, "world_size": loader.world_size, "batch_size": loader.batch_size}
    return state  # not ours: load_state_dict says what does not fit


def _evaluate(
    ctx: DistContext, model: nn.Module, evaluator: DeviceLoader, precision: str
) -> dict[str, float]:
    """Test metrics of the whole test set: each rank evaluates its strided part."""
    count = evaluator.num_samples
    if count == 0 and ctx.is_distributed:  # fewer test samples than ranks
        return ctx.mean({"accuracy": 0.0, "loss": 0.0}, 0)
    return ctx.mean(evaluate(model, evaluator, precision=precision), count)


def _progress(cfg: TrainConfig, epoch: int, loader: DeviceLoader) -> Any:
    """A progress bar over one epoch of ``loader``."""
    from tqdm.auto import tqdm

    # One iter() of our own: tqdm.auto's class calls iter() on what it wraps as well as when
    # iterated, and a DeviceLoader draws a new epoch plan on each iter() (the progress bar
    # would change the data order, and with several ranks give rank 0 another shard plan).
    return tqdm(
        iter(loader), total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
        unit="batch",
    )  # fmt: skip


def _run_sfw_init(cfg, data, model, optimizer, device, channels_last=False) -> dict[str, Any]:
    from ..init import sfw_init

    # A loader of its own (seeded from the run's seed) so the training data order is unchanged.
    loader = train_loader(cfg, data, device, seed=cfg.seed + 7919, channels_last=channels_last)
    iters = cfg.sfw_init_iters or len(loader)
    result = sfw_init(model, optimizer, loader, iters=iters)
    objective = result.objective
    return {
        "iters": result.iters,
        "seconds": result.seconds,
        "objective_first": objective[0] if objective else None,
        "objective_last": objective[-1] if objective else None,
        "scales": result.scales,
    }
