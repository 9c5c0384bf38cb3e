"""A data loader that keeps the whole dataset on the device and builds batches by indexing.

Per epoch: one permutation ``π`` of ``0..N-1`` (identity without ``shuffle``) and, with
``augment``, one crop offset pair and flip bit per position, all drawn from the loader's own
``torch.Generator`` at the start of the epoch. Rank ``r`` of ``world_size`` takes positions
``r, r + world_size, ...`` of that plan, so ranks see disjoint shards of the same epoch. Batches
are normalized on the fly: ``(x/255 - mean) / std`` for ``uint8`` images, ``(x - mean) / std`` else.
``state_dict()`` holds the generator state at the epoch start, the epoch and the batch counter,
so a loader restored from it continues with exactly the batches the original would have given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .augment import crop_flip, draw_crop_flip
from .dataset import Dataset

Tensor = torch.Tensor


def _int_arg(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {low})")
    return value


def _make_generator(generator: torch.Generator | int | None) -> tuple[torch.Generator, int | None]:
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"Invalid generator: device {generator.device} (expected a CPU one)")
        own = torch.Generator()
        own.set_state(generator.get_state())
        return own, None
    if generator is None:  # like torch's DataLoader: follow the global seed
        generator = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ValueError(
            f"Invalid generator: {generator!r} (expected a torch.Generator, an int or None)"
        )
    return torch.Generator().manual_seed(generator), generator


class DeviceLoader:
    """Iterate ``(x_float, y)`` batches of a device-resident dataset.

    Args:
        x: ``N×C×H×W`` images, ``uint8`` (kept as ``uint8`` on the device) or floating.
        y: ``N`` integer labels.
        batch_size: samples per batch (per rank).
        shuffle: draw a new permutation each epoch; else keep the stored order.
        augment: random crop (zero padding ``padding``) + horizontal flip, per batch, vectorised.
        mean, std: ``C`` per-channel values (``x/255`` units for uint8), e.g. ``Dataset.mean``.
        device: where the data lives and batches are made.
        drop_last: skip the last incomplete batch.
        generator: a seed, a CPU ``torch.Generator`` (its state is copied) or ``None`` (a seed
            drawn from torch's global RNG). Distributed ranks must pass the same seed.
        rank, world_size: this process's shard. With ``shuffle`` or ``drop_last`` every rank gets
            ``N // world_size`` samples (ranks step in lockstep); otherwise rank ``r`` gets all of
            ``r, r + world_size, ...`` so an evaluation covers every sample once.
        channels_last: return batches in ``torch.channels_last`` memory format (for CUDA convs).
        padding: crop padding for ``augment`` (4, as for CIFAR).
        dtype: floating dtype of the returned images.

    Example:
        >>> ds = load_dataset("synthetic", limit=100)   # doctest: +SKIP
        >>> loader = DeviceLoader(ds.train_x, ds.train_y, batch_size=32, shuffle=True,
        ...                       mean=ds.mean, std=ds.std, generator=0)
        >>> len(loader), next(iter(loader))[0].shape
        (4, torch.Size([32, 1, 8, 8]))
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool = False,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        generator: torch.Generator | int | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        padding: int = 4,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if x.dim() != 4:
            raise ValueError(f"Invalid x: shape {tuple(x.shape)!r} (expected N×C×H×W)")
        if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
            raise ValueError(f"Invalid x: dtype {x.dtype} (expected uint8 or floating)")
        if y.shape != (x.shape[0],) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(
                f"Invalid y: dtype {y.dtype}, shape {tuple(y.shape)!r} "
                f"(expected integer labels of shape ({x.shape[0]},))"
            )
        channels = x.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(
                f"Invalid mean/std: {tuple(mean)!r}/{tuple(std)!r} "
                f"(expected {channels} values each, std > 0)"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"Invalid dtype: {dtype} (expected a floating dtype)")
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.world_size = _int_arg("world_size", world_size, 1)
        self.rank = _int_arg("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"Invalid rank: {rank!r} (expected 0 <= rank < {world_size})")
        self.padding = _int_arg("padding", padding, 0)
        self.shuffle, self.augment, self.drop_last = bool(shuffle), bool(augment), bool(drop_last)
        self.channels_last, self.dtype = bool(channels_last), dtype
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        pixel = 255.0 if x.dtype == torch.uint8 else 1.0
        m = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
        # x_norm = x * scale - shift, scale = 1/(pixel·std), shift = mean/std
        self._scale = (1.0 / (pixel * s)).to(self.device, torch.float32)
        self._shift = (m / s).to(self.device, torch.float32)
        self._gen, self.seed = _make_generator(generator)
        self.epoch = 0  # epochs finished (or abandoned) so far
        self._batch = 0  # batches handed out in the running epoch
        self._active = False
        self._epoch_state = self._gen.get_state()
        self._resume_batch = 0

    @classmethod
    def from_dataset(cls, dataset: Dataset, split: str, **kwargs: Any) -> DeviceLoader:
        """Loader over ``dataset``'s ``"train"`` or ``"test"`` split with its ``mean``/``std``."""
        if split not in ("train", "test"):
            raise ValueError(f"Invalid split: {split!r} (expected 'train' or 'test')")
        x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
        return cls(x, y, mean=dataset.mean, std=dataset.std, **kwargs)

    @property
    def dataset_size(self) -> int:
        """Samples in the whole dataset (all ranks)."""
        return int(self.x.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n, ws = self.dataset_size, self.world_size
        if self.shuffle or self.drop_last:
            return n // ws
        return len(range(self.rank, n, ws))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def shard(self, rank: int, world_size: int) -> DeviceLoader:
        """A loader for ``rank`` of ``world_size``: same data, options, seed and RNG state."""
        if self._resume_batch or (self._active and 0 < self._batch < len(self)):
            raise ValueError("Invalid shard() call: mid-epoch (expected a call between epochs)")
        other = DeviceLoader(
            self.x, self.y, batch_size=self.batch_size, shuffle=self.shuffle,
            augment=self.augment, mean=self.mean, std=self.std, device=self.device,
            drop_last=self.drop_last, generator=0, rank=rank, world_size=world_size,
            channels_last=self.channels_last, padding=self.padding, dtype=self.dtype,
        )  # fmt: skip
        state = self.state_dict()
        state["world_size"] = world_size
        other.load_state_dict(state)
        other.seed = self.seed
        return other

    def _plan(self) -> tuple[Tensor, Tensor | None]:
        """Indices (this rank's share of the epoch's permutation) and crop/flip parameters."""
        n = self.dataset_size
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        params = None
        if self.augment:
            params = torch.stack(draw_crop_flip(n, padding=self.padding, generator=self._gen))
        end = (n // self.world_size) * self.world_size if self.shuffle or self.drop_last else n
        picks = slice(self.rank, end, self.world_size)
        order = order[picks].to(self.device)
        if params is not None:
            params = params[:, picks].to(self.device)
        return order, params

    def _finish_epoch(self) -> None:
        self.epoch += 1
        self._batch = 0
        self._active = False

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._active:  # the previous epoch's iterator was abandoned
            self._finish_epoch()
        start, self._resume_batch = self._resume_batch, 0
        self._epoch_state = self._gen.get_state()
        order, params = self._plan()
        self._active, self._batch = True, start
        return self._batches(order, params, start)

    def _batches(
        self, order: Tensor, params: Tensor | None, start: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        bs = self.batch_size
        for b in range(start, len(self)):
            idx = order[b * bs : (b + 1) * bs]
            xb = self.x[idx]
            if params is not None:
                p = params[:, b * bs : (b + 1) * bs]
                xb = crop_flip(xb, p[0], p[1], p[2].bool(), padding=self.padding)
            xb = self.normalize(xb)
            self._batch = b + 1
            yield xb, self.y[idx]
        self._finish_epoch()

    def normalize(self, x: Tensor) -> Tensor:
        """``B×C×H×W`` raw images -> normalized floats (``dtype``, ``channels_last`` applied)."""
        out = torch.addcmul(-self._shift, x.to(torch.float32), self._scale).to(self.dtype)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain values and one ``uint8`` tensor: safe for ``torch.load(weights_only=True)``.

        Mid-epoch it records the generator state of the epoch start and the batches handed out,
        so a restored loader replays the same plan and skips those batches.
        """
        epoch, batch, generator = self.epoch, self._resume_batch, self._gen.get_state()
        if self._active and self._batch < len(self):
            batch, generator = self._batch, self._epoch_state
        elif self._active:  # last batch handed out, the for-loop has not asked for more yet
            epoch, batch = self.epoch + 1, 0
        return {
            "epoch": epoch,
            "batch": batch,
            "generator": generator.clone(),
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "augment": self.augment,
            "drop_last": self.drop_last,
            "padding": self.padding,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next ``iter()`` resumes where that state stood."""
        for key in ("dataset_size", "batch_size", "world_size", "shuffle", "augment", "drop_last",
                    "padding"):  # fmt: skip
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"Invalid loader state: {key}={state[key]!r} (this loader has "
                    f"{getattr(self, key)!r}; resuming would not reproduce the batches)"
                )
        batch = _int_arg("batch", state["batch"], 0)
        if batch > len(self):
            raise ValueError(f"Invalid loader state: batch={batch} (epoch has {len(self)})")
        self._gen.set_state(state["generator"].cpu())
        self.epoch = _int_arg("epoch", state["epoch"], 0)
        self._epoch_state = self._gen.get_state()
        self._resume_batch = batch
        self._batch, self._active = 0, False
