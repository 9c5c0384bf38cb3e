"""CIFAR-10: real pickle batches through the restricted unpickler; malicious pickles refused."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import sfwprune.data.cifar as cifar
from sfwprune.data import load_dataset, safe_unpickle


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_real_format(tmp_path, files, protocol):
    batches = files.write_cifar(tmp_path, per_batch=3, n_test=4, protocol=protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (4, 3, 32, 32) and ds.input_shape == (3, 32, 32)
    first = batches["data_batch_1"][b"data"]
    # a row is the R plane, then G, then B, each 32×32 row-major
    i, c, h, w = 2, 1, 5, 30
    assert int(ds.train_x[i, c, h, w]) == int(first[i, c * 1024 + h * 32 + w])
    last = batches["data_batch_5"]
    np.testing.assert_array_equal(ds.train_x[12:].reshape(3, -1).numpy(), last[b"data"])
    assert ds.train_y.tolist() == sum((batches[f"data_batch_{k}"][b"labels"] for k in
                                       range(1, 6)), [])  # fmt: skip
    assert ds.test_y.tolist() == batches["test_batch"][b"labels"]
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    assert ds.source.path == str(tmp_path / "cifar-10-batches-py")


def test_numpy1_module_names_as_in_the_real_files(tmp_path):
    # The real batches (Python 2, numpy 1) name numpy.core.multiarray, not numpy._core.
    data = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw = pickle.dumps({b"data": data, b"labels": [1, 2]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "batch").write_bytes(raw)
    out = safe_unpickle(tmp_path / "batch")
    np.testing.assert_array_equal(out[b"data"], data)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_pickle_is_refused_without_running(tmp_path, files):
    files.write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2], b"x": _Payload(marker)}
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump(evil, fh, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3.*refused global (posix|os|nt)\.system"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
    # protocol 2 stores bytes as _codecs.encode(str, "latin1"); any other codec is refused
    raw = pickle.dumps(b"\xff\x00", protocol=2)
    assert b"_codecs" in raw and b"latin1" in raw
    (tmp_path / "ok").write_bytes(raw)
    assert safe_unpickle(tmp_path / "ok") == b"\xff\x00"
    (tmp_path / "bad").write_bytes(raw.replace(b"latin1", b"base64"))
    with pytest.raises(ValueError, match="refused _codecs.encode"):
        safe_unpickle(tmp_path / "bad")


def test_truncated_batch_names_the_file(tmp_path, files):
    files.write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"test_batch.*truncated"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_wrong_structure_names_the_file(tmp_path, files):
    files.write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_2.*rows of 100 bytes"):
        load_dataset("cifar10", data_dir=tmp_path)
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_2.*1 labels for 2 images"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_batches_folder_itself_env_var_and_limit(tmp_path, monkeypatch, files):
    files.write_cifar(tmp_path, per_batch=4)
    ds = load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py", limit=10)
    assert ds.train_x.shape[0] == 10 and ds.test_x.shape[0] == 2
    monkeypatch.setenv("SFWPRUNE_DATA", str(tmp_path))
    assert load_dataset("cifar10").train_x.shape[0] == 20


def test_missing_and_download(tmp_path, monkeypatch, files):
    files.write_cifar(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="Invalid data_dir: .*missing data_batch_4"):
        load_dataset("cifar10", data_dir=tmp_path / "partial")
    monkeypatch.setenv("SFWPRUNE_DATA", str(tmp_path / "partial"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10")
    msg = str(info.value)
    assert "missing data_batch_4" in msg and "SFWPRUNE_DATA" in msg and "download=True" in msg
    calls = []
    monkeypatch.setattr(cifar, "_download", lambda dest: calls.append(files.write_cifar(dest)))
    with pytest.raises(FileNotFoundError, match="Invalid data_dir"):  # no download over it
        load_dataset("cifar10", data_dir=tmp_path / "partial", download=True)
    ds = load_dataset("cifar10", download=True)
    assert len(calls) == 1 and ds.train_x.shape[0] == 15
    with pytest.raises(ValueError, match="Invalid image_size: 64"):
        load_dataset("cifar10", image_size=64)
