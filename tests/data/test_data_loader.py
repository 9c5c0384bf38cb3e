"""DeviceLoader and the batched crop/flip: exact batches, resumption, sharding, bad arguments."""

from __future__ import annotations

import io

import pytest
import torch

from sfwprune._io import atomic_torch_save, safe_torch_load
from sfwprune.data import (
    DeviceLoader,
    crop_flip,
    crop_flip_reference,
    draw_crop_flip,
    load_dataset,
)


def _images(n=10, c=3, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _ids(n):
    """Float images whose single pixel is the sample index, so batches reveal their samples."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n)


def _loader(x, y, **kw):
    kw.setdefault("mean", (0.0,) * x.shape[1])
    kw.setdefault("std", (1.0,) * x.shape[1])
    return DeviceLoader(x, y, **kw)


def _seen(loader):
    return [int(v) for xb, _ in loader for v in xb.flatten()]


@pytest.mark.parametrize("padding", [0, 1, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_crop_flip_matches_reference(padding, dtype):
    x = _images(n=9, h=6, w=7).to(dtype)
    dy, dx, flip = draw_crop_flip(9, padding=padding, generator=torch.Generator().manual_seed(1))
    out = crop_flip(x, dy, dx, flip, padding=padding)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, crop_flip_reference(x, dy, dx, flip, padding=padding))


def test_crop_flip_hand_cases():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    zero = torch.zeros(1, dtype=torch.int64)
    centre = torch.full((1,), 2)
    assert torch.equal(crop_flip(x, centre, centre, torch.tensor([False]), padding=2), x)
    assert torch.equal(crop_flip(x, centre, centre, torch.tensor([True]), padding=2), x.flip(-1))
    # offset 0 with padding 1 shifts the image down-right by one, zero-filled
    out = crop_flip(x, zero, zero, torch.tensor([False]), padding=1)
    expected = torch.zeros_like(x)
    expected[..., 1:, 1:] = x[..., :3, :3]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="Invalid crop/flip parameters"):
        crop_flip(x, zero, zero, torch.tensor([True, False]))


def test_normalized_batches_in_order():
    x, y = _images(n=10), torch.arange(10) % 3
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = DeviceLoader(x, y, batch_size=4, shuffle=False, mean=mean, std=std)
    assert len(loader) == 3
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    got = torch.cat([b[0] for b in batches])
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (x.float() / 255 - m) / s, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and torch.equal(torch.cat([b[1] for b in batches]), y)
    assert loader.x.dtype == torch.uint8  # stored as uint8, converted per batch


def test_drop_last_and_len():
    x, y = _ids(10)
    assert len(_loader(x, y, batch_size=4, shuffle=True, drop_last=True, generator=0)) == 2
    loader = _loader(x, y, batch_size=4, shuffle=True, drop_last=True, generator=0)
    assert [xb.shape[0] for xb, _ in loader] == [4, 4]


def test_shuffle_is_a_fresh_seeded_permutation_each_epoch():
    x, y = _ids(20)
    loader = _loader(x, y, batch_size=6, shuffle=True, generator=5)
    e1, e2 = _seen(loader), _seen(loader)
    assert sorted(e1) == list(range(20)) and sorted(e2) == list(range(20))
    assert e1 != e2 and loader.epoch == 2
    same = _loader(x, y, batch_size=6, shuffle=True, generator=5)
    assert _seen(same) == e1
    assert _seen(_loader(x, y, batch_size=6, shuffle=True, generator=6)) != e1


def test_generator_arguments():
    x, y = _ids(20)
    g = torch.Generator().manual_seed(11)
    before = g.get_state()
    a = _seen(_loader(x, y, batch_size=5, shuffle=True, generator=g))
    assert torch.equal(g.get_state(), before)  # the caller's generator is copied, not advanced
    assert a == _seen(_loader(x, y, batch_size=5, shuffle=True, generator=11))
    torch.manual_seed(3)
    b = _seen(_loader(x, y, batch_size=5, shuffle=True))
    torch.manual_seed(3)
    assert b == _seen(_loader(x, y, batch_size=5, shuffle=True))  # None follows the global seed


def test_augmented_batches_follow_the_documented_plan():
    x, y = _images(n=12, h=8, w=8), torch.arange(12)
    mean, std = (0.4, 0.5, 0.6), (0.3, 0.2, 0.1)
    loader = DeviceLoader(x, y, batch_size=5, shuffle=True, augment=True, mean=mean, std=std,
                          generator=7)  # fmt: skip
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(12, generator=g)
    dy, dx, flip = draw_crop_flip(12, padding=4, generator=g)
    ref = crop_flip_reference(x[perm], dy, dx, flip, padding=4)
    ref = (ref.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    got = list(loader)
    torch.testing.assert_close(torch.cat([b[0] for b in got]), ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in got]), perm)


@pytest.mark.parametrize("stop_after", [0, 2, 3])
def test_resume_mid_epoch_is_exact(tmp_path, stop_after):
    x, y = _images(n=23, h=8, w=8), torch.arange(23)
    kw = dict(batch_size=4, shuffle=True, augment=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    a = DeviceLoader(x, y, generator=1, **kw)
    list(a)  # one full epoch first
    it = iter(a)
    for _ in range(stop_after):
        next(it)
    atomic_torch_save(a.state_dict(), tmp_path / "loader.pt")
    rest_a = list(it) + [b for b in a]  # rest of this epoch, then the next epoch
    b = DeviceLoader(x, y, generator=999, **kw)
    b.load_state_dict(safe_torch_load(tmp_path / "loader.pt"))  # weights_only loading
    assert b.epoch == 1
    rest_b = list(b) + list(b)
    assert len(rest_a) == len(rest_b) == len(a) - stop_after + len(a)
    for (xa, ya), (xb, yb) in zip(rest_a, rest_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == b.epoch == 3


def test_state_after_last_batch_inside_the_loop():
    x, y = _ids(8)
    a = _loader(x, y, batch_size=4, shuffle=True, generator=2)
    for _ in a:
        state = a.state_dict()  # taken while the loop body runs, after the last batch
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = _loader(x, y, batch_size=4, shuffle=True, generator=0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.epoch == 1 and _seen(b) == _seen(a)


def test_load_state_dict_rejects_other_configurations():
    x, y = _ids(8)
    state = _loader(x, y, batch_size=4, shuffle=True, generator=0).state_dict()
    with pytest.raises(ValueError, match="Invalid loader state: batch_size=4"):
        _loader(x, y, batch_size=2, shuffle=True).load_state_dict(state)
    with pytest.raises(ValueError, match="Invalid loader state: dataset_size=8"):
        _loader(*_ids(9), batch_size=4, shuffle=True).load_state_dict(state)


def test_shards_are_disjoint_strided_views_of_one_permutation():
    n, ws = 23, 3
    x, y = _ids(n)
    full = _seen(_loader(x, y, batch_size=100, shuffle=True, generator=4))
    shards = [_seen(_loader(x, y, batch_size=3, shuffle=True, generator=4, rank=r, world_size=ws))
              for r in range(ws)]  # fmt: skip
    for r, seen in enumerate(shards):
        assert seen == full[: (n // ws) * ws][r::ws] and len(seen) == n // ws
    assert len(set(sum(shards, []))) == (n // ws) * ws  # disjoint
    base = _loader(x, y, batch_size=3, shuffle=True, generator=4)
    assert _seen(base.shard(1, ws)) == shards[1]
    lens = {len(_loader(x, y, batch_size=3, shuffle=True, rank=r, world_size=ws)) for r in range(3)}
    assert lens == {3}  # ranks step in lockstep


def test_unshuffled_shards_cover_every_sample_once():
    x, y = _ids(10)
    seen = [_seen(_loader(x, y, batch_size=2, shuffle=False, rank=r, world_size=3))
            for r in range(3)]  # fmt: skip
    assert seen == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_channels_last_dtype_and_from_dataset():
    ds = load_dataset("synthetic", limit=16, channels=3)
    loader = DeviceLoader.from_dataset(ds, "train", batch_size=8, shuffle=False,
                                       channels_last=True, dtype=torch.float64)  # fmt: skip
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.float64 and xb.is_contiguous(memory_format=torch.channels_last)
    m, s = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, ((ds.train_x[:8].double() - m) / s), rtol=1e-6, atol=1e-6)
    assert torch.equal(yb, ds.train_y[:8])
    with pytest.raises(ValueError, match="Invalid split"):
        DeviceLoader.from_dataset(ds, "val", batch_size=8, shuffle=False)


def test_abandoned_epoch_counts_and_bad_arguments():
    x, y = _ids(8)
    loader = _loader(x, y, batch_size=2, shuffle=True, generator=0)
    next(iter(loader))
    list(loader)
    assert loader.epoch == 2
    with pytest.raises(ValueError, match="Invalid shard"):
        it = iter(loader)
        next(it)
        loader.shard(0, 2)
    bad = [
        (dict(batch_size=0), "Invalid batch_size: 0"),
        (dict(rank=2, world_size=2), "Invalid rank: 2"),
        (dict(mean=(0.0, 0.0)), "Invalid mean/std"),
        (dict(std=(0.0,)), "Invalid mean/std"),
        (dict(generator="seed"), "Invalid generator: 'seed'"),
        (dict(dtype=torch.int32), "Invalid dtype"),
    ]
    for extra, msg in bad:
        kw = {"batch_size": 2, "shuffle": True, **extra}
        with pytest.raises(ValueError, match=msg):
            _loader(x, y, **kw)
    with pytest.raises(ValueError, match="Invalid y"):
        _loader(x, torch.zeros(7, dtype=torch.int64), batch_size=2, shuffle=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _images(n=64, h=16, w=16), torch.arange(64)
    kw = dict(batch_size=16, shuffle=True, augment=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    cpu = list(DeviceLoader(x, y, generator=3, **kw))
    gpu = list(DeviceLoader(x, y, generator=3, device="cuda", channels_last=True, **kw))
    assert gpu[0][0].is_cuda and DeviceLoader(x, y, device="cuda", **kw).x.dtype == torch.uint8
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(xg.cpu(), xc, rtol=1e-5, atol=1e-5)
        assert torch.equal(yg.cpu(), yc)
