"""Untrusted files: a checkpoint, pruned model or CIFAR batch crafted to run code when unpickled is
refused by every loader of ours with a clear message, and the code never runs.

Each payload's ``__reduce__`` makes unpickling call a function that creates a marker file
(``pathlib.Path.touch``, ``os.system("touch ...")``, ``open(path, "w")``). A control test proves the
payloads are live: a plain ``pickle.loads`` does create the marker.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from sfwprune import _io
from sfwprune.cli import main
from sfwprune.data import load_cifar10, safe_unpickle
from sfwprune.experiments.runner import CHECKPOINT_FILE, load_checkpoint, load_trained
from sfwprune.models import build_model
from sfwprune.prune import load_pruned, save_pruned


class _Touch:
    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


class _System:
    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


class _Open:
    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


PAYLOADS = {"path_touch": _Touch, "os_system": _System, "builtins_open": _Open}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _checkpoint_like(evil) -> dict:
    """What a real checkpoint holds, with one entry swapped for the payload."""
    return {"format": 1, "epoch": 1, "model": {"fc.weight": torch.zeros(2)}, "rng": evil}


# (name, how the payload is stored): torch's zip format, legacy torch format, raw pickles.
FORMATS = {
    "torch_save_zip": lambda evil: _torch_bytes(_checkpoint_like(evil)),
    "torch_save_plain_object": lambda evil: _torch_bytes(evil),
    "torch_save_legacy": lambda evil: _legacy_bytes(_checkpoint_like(evil)),
    "pickle_protocol_2": lambda evil: pickle.dumps(_checkpoint_like(evil), protocol=2),
    "pickle_protocol_5": lambda evil: pickle.dumps(evil, protocol=5),
}


def _legacy_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payloads_are_live_when_unpickled_unsafely(payload, tmp_path) -> None:
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(PAYLOADS[payload](marker)))
    assert marker.exists()  # so the refusals below are real refusals


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_safe_torch_load_refuses_and_runs_nothing(payload, fmt, tmp_path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    path.write_bytes(FORMATS[fmt](PAYLOADS[payload](marker)))
    with pytest.raises(ValueError, match=r"Invalid file: .*evil\.pt.*refused") as info:
        _io.safe_torch_load(path)
    assert not marker.exists()
    msg = str(info.value)
    assert "nothing from it was run" in msg and "\x1b[" not in msg and "\n" not in msg
    assert "weights_only` set to `False`" not in msg  # no advice on how to switch safety off


@pytest.fixture
def evil_run(run_copy, tmp_path):
    """A real run folder whose checkpoint.pt was replaced by a payload; returns (run, marker)."""
    marker = tmp_path / "MARKER"
    (run_copy / CHECKPOINT_FILE).write_bytes(_torch_bytes(_checkpoint_like(_System(marker))))
    return run_copy, marker


def test_runner_loaders_refuse(evil_run) -> None:
    run, marker = evil_run
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(run)
    with pytest.raises(ValueError, match="refused"):
        load_trained(run, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "{run}", "--sparsities", "0,0.5"],
        ["prune", "{run}", "--sparsity", "0.5", "--out", "{tmp}/pruned.pt"],
        ["--quiet", "train", "--resume", "--out", "{run}"],
        ["plot", "{run}", "--weights", "--out", "{tmp}/w.png"],
    ],
    ids=["sweep", "prune", "train-resume", "plot-weights"],
)
def test_cli_refuses_with_one_line(argv, evil_run, tmp_path, capsys, listing) -> None:
    run, marker = evil_run
    before = listing(tmp_path)
    code = main([a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "refused" in err and "checkpoint.pt" in err and "Traceback" not in err
    assert not marker.exists()
    assert listing(tmp_path) == before  # no sweep.json, pruned.pt, figure or new checkpoint


def test_load_pruned_refuses(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    model = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10, seed=0)
    good = save_pruned(model, tmp_path / "good.pt")
    obj = torch.load(good, weights_only=True)
    obj["dense"] = _Touch(marker)  # a genuine pruned file with one entry swapped
    evil = tmp_path / "evil.pruned.pt"
    evil.write_bytes(_torch_bytes(obj))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="refused"):
        load_pruned(evil, model)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- CIFAR-10 python batches: the restricted unpickler --------------------------------------


def _cifar_batch(n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"labels": [int(i % 10) for i in range(n)],
    }


def _cifar_folder(root: pathlib.Path, evil_batch: bytes | None = None) -> pathlib.Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(), protocol=2))
    if evil_batch is not None:
        (folder / "data_batch_3").write_bytes(evil_batch)
    return folder


def test_cifar_control_plain_batches_load(tmp_path) -> None:
    _cifar_folder(tmp_path)
    ds = load_cifar10(data_dir=tmp_path)
    assert tuple(ds.train_x.shape) == (20, 3, 32, 32)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_cifar_refuses_malicious_batch(payload, protocol, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SFWPRUNE_DATA", raising=False)
    marker = tmp_path / "MARKER"
    batch = {**_cifar_batch(), b"labels": PAYLOADS[payload](marker)}
    raw = pickle.dumps(batch, protocol=protocol)
    folder = _cifar_folder(tmp_path / "data", evil_batch=raw)
    with pytest.raises(ValueError, match=r"Invalid pickle file: .*data_batch_3.*refused"):
        safe_unpickle(folder / "data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(data_dir=tmp_path / "data")
    assert not marker.exists()


def test_cifar_refuses_non_latin1_codec(tmp_path) -> None:
    # Protocol 2 encodes bytes as _codecs.encode(text, "latin1"); any other codec is refused.
    raw = pickle.dumps(b"ok", protocol=2)
    assert b"latin1" in raw
    raw = raw.replace(b"latin1", b"rot_13")  # same length, a real codec
    path = tmp_path / "batch"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="Invalid pickle file"):
        safe_unpickle(path)


# --- bounded reads: nothing inflates beyond what the header promises -------------------------


def _bomb(method: str, size: int) -> torch.Tensor:
    """``size`` zero bytes compressed: a few hundred KB that would inflate to ``size``."""
    import lzma
    import zlib

    packer = zlib.compressobj(9) if method == "zlib" else lzma.LZMACompressor(preset=1)
    chunk = bytes(1 << 20)
    parts = [packer.compress(chunk) for _ in range(size >> 20)] + [packer.flush()]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("method", "field", "size"),
    [("zlib", "mask", 200 << 20), ("zlib", "values", 200 << 20), ("lzma", "mask", 24 << 20)],
)
def test_load_pruned_zip_bomb_is_refused_in_bounded_memory(tmp_path, method, field, size) -> None:
    import tracemalloc

    model = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10, seed=0)
    obj = torch.load(
        save_pruned(model, tmp_path / "good.pt", compression=method), weights_only=True
    )
    obj[field] = _bomb(method, size)
    bomb = tmp_path / "bomb.pruned.pt"
    bomb.write_bytes(_torch_bytes(obj))
    assert bomb.stat().st_size < size / 50  # small file, huge inflation
    before = [p.detach().clone() for p in model.parameters()]
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"{field} inflates to more than the .* bytes"):
            load_pruned(bomb, model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # the model is ~50k params; nothing near the bomb's size
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_load_pruned_short_stream_is_refused(tmp_path) -> None:
    import zlib

    model = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10, seed=0)
    obj = torch.load(save_pruned(model, tmp_path / "good.pt"), weights_only=True)
    obj["mask"] = torch.frombuffer(bytearray(zlib.compress(b"\xff" * 10)), dtype=torch.uint8)
    (tmp_path / "short.pt").write_bytes(_torch_bytes(obj))
    with pytest.raises(ValueError, match=r"corrupt data: mask has 10 bytes, expected \d+"):
        load_pruned(tmp_path / "short.pt", model)


def test_safe_torch_load_refuses_compressed_zip_entries(tmp_path) -> None:
    import zipfile

    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1 << 16)}, good)
    assert _io.safe_torch_load(good)["w"].numel() == 1 << 16
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(deflated, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert deflated.stat().st_size < good.stat().st_size / 10
    with pytest.raises(ValueError, match=r"Invalid file: .*deflated.pt.* is compressed to inflate"):
        _io.safe_torch_load(deflated)
