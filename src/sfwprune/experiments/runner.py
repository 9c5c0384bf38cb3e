"""Training runs on disk: ``RUN_DIR/{config.json, metrics.jsonl, checkpoint.pt, summary.json}``.

A checkpoint is written atomically at the end of every epoch and holds everything a resumed run
needs to continue exactly: model, optimizer, schedule, data-order and RNG states, epoch.

Under ``torchrun`` (see :mod:`sfwprune.distributed` and docs/scaling.md) ``batch_size`` stays the
global batch, split evenly over the ranks; rank 0 alone writes the files, and metrics are sums
over all ranks, so a run's files look the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _io
from ..acdc import ACDCSchedule
from ..data import Dataset, DeviceLoader, check_source, load_dataset
from ..distributed import DistContext, init_distributed, local_batch_size
from ..models import build_model
from ..train import build_optimizer, build_scheduler, evaluate, fit
from .config import TrainConfig
from .provenance import provenance

CHECKPOINT_FORMAT = 1
CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE = (
    "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json",
)  # fmt: skip
LOCK_FILE = ".lock"
# Files derived from a run's weights: stale once the run is trained again in its folder.
DERIVED_GLOBS = ("sweep.json", "sweep.csv", "sweep-*.json", "sweep-*.csv", SUMMARY_FILE)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"Invalid device: {name!r} (expected auto, cpu, cuda or cuda:N)") from None
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


def read_run_file(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``config.json`` as stored: ``{"config", "run_id", "data_source", "provenance"}``
    (``run_id`` and ``data_source`` are missing in runs made before they were recorded)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Invalid run folder: {str(run_dir)!r} (no {CONFIG_FILE}; train a run there first)"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        values["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(
            f"Invalid run config: {str(path)!r} (not an sfwprune config.json: {type(exc).__name__})"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"Invalid run config: {str(path)!r} (expected a JSON object)")
    return values


def read_config(run_dir: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(read_run_file(run_dir)["config"])


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an sfwprune run: a ``config.json`` object with ``config`` and
    ``provenance`` (what :func:`train_run` writes first). A checkpoint alone does not make one."""
    try:
        values = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "config" in values and "provenance" in values


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, one per epoch in epoch order.

    Blank lines, torn lines (a crash mid-write) and lines that are not a row (an object with an
    integer ``epoch`` >= 1) are skipped, never the rows after them; a repeated epoch keeps its
    last row.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            rows[epoch] = row
    return [rows[e] for e in sorted(rows)]


def _config_diff(stored: TrainConfig, given: TrainConfig) -> dict[str, tuple[Any, Any]]:
    a, b = stored.to_dict(), given.to_dict()  # nested dicts on both sides
    return {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v}


def load_checkpoint(run_dir: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The run's checkpoint, loaded with ``weights_only=True``; clear errors when unusable.

    The checkpoint must belong to the run's ``config.json``: same config, and (when both record
    one) the same ``run_id``; a checkpoint copied in from another run, or a hand-edited config,
    is refused.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    ckpt = _io.safe_torch_load(path, map_location=device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise ValueError(f"Invalid checkpoint: {str(path)!r} (not an sfwprune checkpoint)")
    record = read_run_file(run_dir)
    if "config" in ckpt:
        try:
            own = TrainConfig.from_dict(ckpt["config"])
        except ValueError as exc:
            raise ValueError(f"Invalid checkpoint: {str(path)!r} (its config: {exc})") from None
        diff = _config_diff(own, TrainConfig.from_dict(record["config"]))
        if diff:
            raise ValueError(
                f"Invalid run folder: {str(run_dir)!r} ({CHECKPOINT_FILE} was made with another "
                f"config than {CONFIG_FILE}; checkpoint vs config.json: {diff})"
            )
    ours, theirs = record.get("run_id"), ckpt.get("run_id")
    if ours and theirs and ours != theirs:
        raise ValueError(
            f"Invalid run folder: {str(run_dir)!r} ({CHECKPOINT_FILE} belongs to another run: "
            f"run_id {theirs!r}, {CONFIG_FILE} has {ours!r})"
        )
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


@dataclass
class TrainedRun:
    """A run's model with its checkpoint's weights, and which weights those are."""

    config: TrainConfig
    model: nn.Module
    data: Dataset
    epoch: int  # the checkpoint's epoch: what an evaluation of ``model`` evaluates
    run_id: str | None
    finished: bool  # summary.json written and no process training it

    def record(self) -> dict[str, Any]:
        """What results files derived from these weights record (``"run"`` in sweep.json)."""
        return {"run_id": self.run_id, "epoch": self.epoch, "finished": self.finished}


def load_run(
    run_dir: str | Path, device: torch.device | str | None = None, *, allow_partial: bool = False
) -> TrainedRun:
    """The run in ``run_dir`` with its checkpoint loaded, for evaluation (sweep, prune, plot).

    Only a finished run (``summary.json`` there, no training process holding its lock) is
    loaded, unless ``allow_partial``: then the latest checkpoint of a run that is still
    training, or was stopped, is used, and :attr:`TrainedRun.epoch` says which. The data must be
    the data the run was trained on (the ``data_source`` hash of its ``config.json``).
    """
    run_dir = Path(run_dir)
    record = read_run_file(run_dir)
    cfg = TrainConfig.from_dict(record["config"])
    training = run_is_locked(run_dir)
    finished = not training and (run_dir / SUMMARY_FILE).is_file()
    if not finished and not allow_partial:
        why = (
            "a training process is still writing it; wait for it to finish"
            if training
            else f"its training did not finish (no {SUMMARY_FILE}); finish it with "
            f"`sfwprune train --resume --out {run_dir}`"
        )
        raise ValueError(
            f"Invalid run folder: {str(run_dir)!r} ({why}, or pass --allow-partial to use its "
            "latest checkpoint)"
        )
    device = resolve_device(cfg.device if device is None else str(device))
    data = load_data(cfg)
    check_source(record.get("data_source"), data.source)
    model = make_model(cfg, data, device)
    ckpt = load_checkpoint(run_dir, device)
    load_model_state(model, ckpt["model"], str(run_dir / CHECKPOINT_FILE))
    return TrainedRun(cfg, model, data, int(ckpt["epoch"]), record.get("run_id"), finished)


def load_trained(
    run_dir: str | Path, device: torch.device | str | None = None, *, allow_partial: bool = False
):
    """``(config, model, data)`` of a finished run (see :func:`load_run`), weights loaded."""
    run = load_run(run_dir, device, allow_partial=allow_partial)
    return run.config, run.model, run.data


class Terminated(KeyboardInterrupt):
    """SIGTERM received: unwinds like Ctrl-C (temporary files removed, lock released)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM (what ``kill`` and schedulers send) raises :class:`Terminated`,
    so it stops as cleanly as SIGINT. Only where SIGTERM still has its default action (a
    caller's own handler is kept) and in the main thread."""
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def run_lock(folder: Path):
    """Hold an exclusive ``flock`` on ``folder/.lock``; another holder means another process is
    writing the run, and is refused with a one-line ``ValueError``."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ValueError(
            f"Invalid output folder: {str(folder)!r} (not writable: {exc.strerror})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(
                f"Invalid output folder: {str(folder)!r} (another sfwprune process is training "
                f"in it and holds {LOCK_FILE}; wait for it to finish or choose another --out)"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def run_is_locked(folder: str | Path) -> bool:
    """Whether a process holds the run lock of ``folder`` (is training in it now)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """The rule for an output file (``prune --out``, ``plot --out``): it never resolves (through
    symlinks too) onto a run's own files, and is never a folder or an empty name."""
    if str(path) in ("", "."):
        raise ValueError(f"Invalid {flag}: {str(path)!r} (expected a file name)")
    path = Path(path)
    real = path.resolve()
    if real.is_dir():
        raise ValueError(f"Invalid {flag}: {str(path)!r} (it is a folder; expected a file name)")
    if is_run_folder(real.parent) and _is_run_file(real.name):
        raise ValueError(
            f"Invalid {flag}: {str(path)!r} (it is {real.name} of the run in "
            f"{str(real.parent)!r}; write the output under another name)"
        )
    return path


def _is_run_file(name: str) -> bool:
    import fnmatch

    own = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, LOCK_FILE, *DERIVED_GLOBS)
    return name.startswith(".") or any(fnmatch.fnmatch(name, pattern) for pattern in own)


@dataclass
class RunResult:
    config: TrainConfig
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module


def _prepare_folder(out: Path, resume: bool | str, held: contextlib.ExitStack) -> bool:
    """The one rule for a run folder; returns whether to resume from its checkpoint.

    - ``out`` is new, empty, or an sfwprune run (:func:`is_run_folder`): never a non-empty
      folder of other files, never the current folder unless it is a run, never a file or a
      dangling symlink;
    - it is locked (:func:`run_lock`) for as long as ``held`` is: a second writer is refused;
    - ``resume=True`` needs a run with a checkpoint there (never starts over); ``"auto"`` resumes
      one if there, else starts; without ``resume`` a checkpoint there is refused, not replaced;
    - a new start in a run folder deletes the files derived from the old weights (sweeps,
      summary), and every start deletes temporary files a killed process left.
    """
    name = str(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(
            f"Invalid output folder: {name!r} (a symlink to {os.readlink(out)!r}, which does "
            "not exist)"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"Invalid output folder: {name!r} (it is a file, not a folder)")
    if resume is True and not is_run_folder(out):
        raise ValueError(
            f"Invalid --resume: no run in {name!r} (no {CONFIG_FILE} of a run there; drop "
            "--resume to start a new run)"
        )
    if out.is_dir() and not is_run_folder(out):
        if out.resolve() == Path.cwd().resolve():
            raise ValueError(
                f"Invalid output folder: {name!r} (the current folder; name a folder for the run, "
                "e.g. runs/NAME)"
            )
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ValueError(
                f"Invalid output folder: {name!r} (not empty and not an sfwprune run; choose a "
                "new or empty folder)"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"Invalid output folder: {name!r} ({exc.strerror})") from None
    held.enter_context(run_lock(out))
    has_ckpt = (out / CHECKPOINT_FILE).is_file()
    if resume is True and not has_ckpt:
        raise ValueError(
            f"Invalid --resume: the run in {name!r} has no {CHECKPOINT_FILE} (nothing to resume; "
            "drop --resume to train it again from the start)"
        )
    if has_ckpt and not resume:
        raise ValueError(
            f"Invalid output folder: {name!r} (it holds a run already; pass --resume to "
            "continue it or choose another --out)"
        )
    stale = [p for p in out.glob(".*.tmp")]  # from a killed writer: we hold the lock now
    if not has_ckpt:
        stale += [p for pattern in DERIVED_GLOBS for p in out.glob(pattern)]
    for path in stale:
        path.unlink(missing_ok=True)
    probe = out / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"Invalid output folder: {name!r} (not writable: {exc.strerror})"
        ) from None
    return has_ckpt


def train_run(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool | str = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its checkpoint exactly.

    ``resume=True`` requires a run with a checkpoint in ``out_dir``; ``resume="auto"`` continues
    one when there and starts otherwise. The folder rules are :func:`_prepare_folder`'s; the
    folder stays locked while training, and SIGTERM stops like Ctrl-C (KeyboardInterrupt).

    ``stop_after_epoch`` ends the run early after that epoch (for tests of interruption).
    Started by ``torchrun`` (or inside a process group the caller set up) it trains
    data-parallel (:mod:`sfwprune.distributed`): rank 0 writes the files and logs, and every
    rank returns the same metrics and weights.
    """
    cfg.validate()
    if resume not in (False, True, "auto"):
        raise ValueError(f"Invalid resume: {resume!r} (expected False, True or 'auto')")
    resolve_device(cfg.device)  # a bad device name fails here, as a ValueError
    ctx = init_distributed(cfg.device)
    with sigterm_as_interrupt(), contextlib.ExitStack() as held:
        return _train_run(
            ctx, cfg, Path(out_dir), resume=resume, quiet=quiet or not ctx.is_main, log=log,
            stop_after_epoch=stop_after_epoch, held=held,
        )  # fmt: skip


def _train_run(
    ctx: DistContext,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool | str,
    quiet: bool,
    log: Callable[[str], None],
    stop_after_epoch: int | None,
    held: contextlib.ExitStack,
) -> RunResult:
    start = time.perf_counter()
    device = ctx.device
    # Data first: a missing dataset must fail before the run folder exists.
    data = ctx.main_first(lambda: load_data(cfg))  # rank 0 first: it may fill a cache
    resuming = ctx.main_only(lambda: _check_folder(cfg, out, resume, held, data))
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
    warmup = round(cfg.warmup_epochs * len(loader))
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.epochs * len(loader), warmup)
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
        ctx.main_only(lambda: _write_start_files(out, cfg, ctx, data))
    net = ctx.wrap(model)

    elapsed = metrics[-1]["elapsed_seconds"] if metrics else 0.0
    t0 = 0.0

    # AC/DC: the schedule changes the masks fit reads at every step; a resumed run inside a
    # sparse phase re-derives the same mask from its already-pruned weights.
    acdc = None if cfg.acdc_sparsity is None else ACDCSchedule(cfg.epochs, cfg.acdc_sparsity)
    masks: dict[str, torch.Tensor] = {}

    def on_epoch_start(epoch: int) -> None:
        nonlocal t0
        t0 = time.perf_counter()
        if acdc is not None:
            new = acdc.masks_for(model, epoch, masks or None)
            if new is not masks:
                masks.clear()
                masks.update(new or {})

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
            net, loader, optimizer, epochs=cfg.epochs, scheduler=scheduler, masks=masks,
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
        "epochs_done": metrics[-1]["epoch"] if metrics else 0,
        "train_seconds": metrics[-1]["elapsed_seconds"] if metrics else 0.0,
        "final": metrics[-1] if metrics else None,
        "sfw_init": init_info,
    }
    if summary["epochs_done"] == cfg.epochs:
        ctx.main_only(lambda: _io.atomic_write_json(out / SUMMARY_FILE, summary))
    return RunResult(cfg, metrics, summary, model)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether to run ``model`` in ``channels_last``: on CUDA, for models with 2-d convolutions
    (tensor cores read NHWC; an MLP gains nothing)."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _check_folder(
    cfg: TrainConfig, out: Path, resume: bool | str, held: contextlib.ExitStack, data: Dataset
) -> bool:
    """Rank 0: prepare and lock ``out``; with a checkpoint there, check it was made with ``cfg``
    on the same data."""
    resuming = _prepare_folder(out, resume, held)
    if resuming:
        record = read_run_file(out)
        stored = TrainConfig.from_dict(record["config"])
        check_source(record.get("data_source"), data.source)
        if stored != cfg:
            diff = _config_diff(stored, cfg)
            raise ValueError(
                f"Invalid --resume: the run in {str(out)!r} was made with another config "
                f"(stored vs given: {diff})"
            )
    return resuming


def _provenance(ctx: DistContext, **kw: Any) -> dict[str, Any]:
    return {**provenance(ctx.device, **kw), **ctx.describe()}


def _write_start_files(out: Path, cfg: TrainConfig, ctx: DistContext, data: Dataset) -> None:
    # run_id: which training made the weights (checkpoints and sweeps record it);
    # data_source: the data it was made from (sweep / prune / resume check it).
    record = {
        "config": cfg.to_dict(), "run_id": uuid.uuid4().hex,
        "data_source": data.source.as_dict(), "provenance": _provenance(ctx),
    }  # fmt: skip
    _io.atomic_write_text(out / METRICS_FILE, "")
    _io.atomic_write_json(out / CONFIG_FILE, record)


def _truncate_metrics(out: Path, epochs: int) -> list[dict[str, Any]]:
    """The metrics rows of the first ``epochs`` epochs, rewritten as the file's whole content."""
    metrics = [row for row in read_metrics(out) if row["epoch"] <= epochs]
    _io.atomic_write_text(out / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
    return metrics


def _write_epoch(out: Path, ckpt: dict[str, Any], row: dict[str, Any]) -> None:
    # The metrics line first: a kill between the two leaves a line past the checkpoint, which
    # --resume drops (it keeps the lines of the checkpoint's epochs), never a missing line.
    _io.append_line(out / METRICS_FILE, json.dumps(row))
    _io.atomic_torch_save(
        {**ckpt, "run_id": read_run_file(out).get("run_id")}, out / CHECKPOINT_FILE
    )


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
