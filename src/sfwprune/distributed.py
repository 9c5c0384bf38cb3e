"""Data-parallel training across processes with PyTorch's own engine (``torch.distributed``).

Under ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) every
process joins one process group, backend ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``) and
``gloo`` on CPU, and the model is wrapped in ``DistributedDataParallel``: gradients are averaged,

    g = (1/W) Σ_r ∇L_r(θ),   L_r the mean loss over rank r's B/W samples of the global batch,

before the optimizer step, so every rank computes the same SFW vertex and stays bit-identical.
One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is the same code with no process group.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_OWN_GROUP = False  # whether init_distributed created the process group (shutdown ends it)


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    values = {}
    for name in _ENV:
        text = os.environ.get(name)
        try:
            values[name] = int(text) if text not in (None, "") else None
        except ValueError:
            raise ValueError(
                f"Invalid {name}: {text!r} (expected an integer, as torchrun sets)"
            ) from None
    world = values["WORLD_SIZE"] if values["WORLD_SIZE"] is not None else 1
    rank = values["RANK"] if values["RANK"] is not None else 0
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"Invalid torchrun environment: RANK={rank!r}, WORLD_SIZE={world!r}, "
            f"LOCAL_RANK={local!r} (expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)"
        )
    return rank, world, local


def rank_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of one rank: ``auto`` is CUDA when available, and with several ranks a plain
    ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process, as NCCL requires).

    Example:
        >>> rank_device("cpu", local_rank=1, world_size=2)
        device(type='cpu')
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r} (CUDA is not available here; use cpu or auto)")
    if world_size == 1:
        return device
    if device.index is not None:
        raise ValueError(
            f"Invalid device: {name!r} (with {world_size} processes each rank uses "
            "cuda:LOCAL_RANK; pass cuda or auto, and choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"Invalid LOCAL_RANK: {local_rank} (this node has {torch.cuda.device_count()} "
            "visible GPUs; start at most that many processes per node)"
        )
    return torch.device("cuda", local_rank)


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Samples per rank when ``batch_size`` is the global batch: ``batch_size / world_size``.

    Example:
        >>> local_batch_size(128, 4)
        32
    """
    if batch_size % world_size:
        raise ValueError(
            f"Invalid batch_size: {batch_size!r} (the global batch must split evenly over "
            f"{world_size} processes; use a multiple of {world_size})"
        )
    return batch_size // world_size


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device.

    With ``world_size == 1`` every collective is a no-op and :meth:`wrap` returns the model.
    Collectives take tensors on ``device`` (NCCL needs CUDA tensors, gloo CPU ones).

    Example:
        >>> ctx = init_distributed("cpu")
        >>> net = ctx.wrap(model)  # DDP under torchrun; build the optimizer on model first
        >>> ctx.main_only(lambda: save(model.state_dict()))  # rank 0 writes, the others wait
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """Plain values for results files: ``world_size`` and ``backend``."""
        return {"world_size": self.world_size, "backend": self.backend}

    def barrier(self) -> None:
        if self.is_distributed:
            ids = [self.device.index] if self.backend == "nccl" else None
            dist.barrier(device_ids=ids)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks, in float64."""
        if not self.is_distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, means: Mapping[str, float], count: int) -> dict[str, float]:
        """Means over all ranks' samples, from this rank's ``means`` over its ``count`` samples:
        ``Σ_r count_r·mean_r / Σ_r count_r`` per key (``means`` as given with one process)."""
        if not self.is_distributed:
            return dict(means)
        keys = sorted(means)
        sums = self.all_reduce_sum([means[k] * count for k in keys] + [count])
        return {k: total / sums[-1] for k, total in zip(keys, sums[:-1], strict=True)}

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def main_only(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 alone; every rank returns its (small, picklable) result, or
        raises its exception.

        The others wait for it (a barrier), so nobody goes on while rank 0 writes a file, and
        an error on rank 0 (e.g. a bad ``--out``) stops every rank instead of hanging them.
        """
        if not self.is_distributed:
            return fn()
        return self.broadcast_object(self._on_main(fn))

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on the others (e.g. a load that may fill a cache); each
        rank returns its own result. An error on rank 0 is raised on every rank."""
        if not self.is_distributed:
            return fn()
        result = self._on_main(fn)
        return result if self.is_main else fn()

    def _on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 (``None`` elsewhere) once rank 0 is done; its error everywhere."""
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # shared below, re-raised on every rank
                error = exc
        shared = self.broadcast_object(_shareable(error) if self.is_main else None)
        if error is not None:
            raise error
        if shared is not None:
            raise shared
        return result

    def sync_buffers_(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every rank, in place."""
        if self.is_distributed:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` (rank 0's weights and buffers broadcast now);
        ``model`` itself with one process. Build the optimizer on ``model`` before this."""
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None


def _shareable(error: BaseException | None) -> BaseException | None:
    """``error`` if it pickles (so other ranks raise the same type), else a RuntimeError."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its state_dict has no
    ``module.`` prefix); any other model unchanged."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def init_distributed(device: str = "auto") -> DistContext:
    """This process's :class:`DistContext`; joins torchrun's process group on the first call.

    With ``WORLD_SIZE > 1`` the first call runs ``init_process_group`` (``nccl`` on CUDA,
    ``gloo`` on CPU, env:// rendezvous); later calls, and a group the caller initialized, reuse
    the open group. It stays open for the life of the process (:func:`shutdown` at exit): a
    group destroyed and created again in one torchrun process can meet stale peer addresses in
    torchrun's store and hang. One process: no group at all.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (one process only), as in the config.

    Example:
        >>> ctx = init_distributed("cpu")  # under torchrun --nproc_per_node=2: ranks 0 and 1
        >>> ctx.rank, ctx.world_size
        (0, 1)
    """
    global _OWN_GROUP
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        backend = dist.get_backend() if world > 1 else None
    else:
        rank, world, local = env_ranks()
        backend = None
    dev = rank_device(device, local, world)
    if world == 1:
        return DistContext(rank, 1, local, dev, None)
    if backend is None:
        backend = _init_group(rank, world, dev)
        _OWN_GROUP = True
        atexit.register(shutdown)
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(
            f"Invalid device: {device!r} (this process group uses nccl, which needs CUDA; "
            "pass cuda or auto)"
        )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(rank, world, local, dev, backend)


def _init_group(rank: int, world: int, device: torch.device) -> str:
    if not dist.is_available():
        raise ValueError(
            f"Invalid WORLD_SIZE: {world} (this PyTorch build has no torch.distributed)"
        )
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(
            f"Invalid torchrun environment: WORLD_SIZE={world} without {', '.join(missing)} "
            "(start the processes with torchrun, which sets them)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, rank=rank, world_size=world, device_id=device if device.type == "cuda" else None
    )
    return backend


def shutdown() -> None:
    """Destroy the process group :func:`init_distributed` created (no-op otherwise)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False
