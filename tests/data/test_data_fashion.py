"""Fashion-MNIST: IDX parsing, folder layouts, lookup order, download gate, one clear error."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import sfwprune.data.fashion_mnist as fm
from sfwprune.data import load_dataset, read_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def test_idx_header_is_the_real_format(tmp_path, files):
    arrays = files.write_fashion(tmp_path, gz=False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", raw[4:16]) == (12, 28, 28)
    assert (tmp_path / "train-labels-idx1-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x01"
    np.testing.assert_array_equal(
        read_idx(tmp_path / "train-images-idx3-ubyte", magic=files.IMAGES_MAGIC),
        arrays["train-images-idx3-ubyte"],
    )


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    header = struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">2I", 2, 3)
    (tmp_path / "ints.idx").write_bytes(header + values.tobytes())
    out = read_idx(tmp_path / "ints.idx")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values.astype(np.int32))


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", [".", "fashion-mnist", "FashionMNIST/raw"])
def test_load_from_data_dir_layouts(tmp_path, gz, layout, files):
    arrays = files.write_fashion(tmp_path / layout, gz=gz)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (12, 1, 28, 28)
    assert ds.test_x.shape == (5, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10
    assert Path(ds.source.path) == tmp_path / layout
    expected_mean = arrays["train-images-idx3-ubyte"].mean() / 255
    assert ds.mean[0] == pytest.approx(expected_mean, rel=1e-9)


def test_lookup_order_data_dir_then_env_then_system(tmp_path, monkeypatch, files):
    arg, env, system = tmp_path / "arg", tmp_path / "env", tmp_path / "system"
    files.write_fashion(arg, n_train=6)
    files.write_fashion(env, n_train=7)
    files.write_fashion(system, n_train=8)
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    monkeypatch.setenv("SFWPRUNE_DATA", str(env))
    assert load_dataset("fashion-mnist", data_dir=arg).train_x.shape[0] == 6
    assert load_dataset("fashion-mnist").train_x.shape[0] == 7
    # a data_dir without the files is an error, never a fall-through to the env folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Invalid data_dir: .*empty"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    monkeypatch.delenv("SFWPRUNE_DATA")
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape[0] == 8 and ds.source.path == str(system)


def test_not_found_names_all_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("SFWPRUNE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    for needle in ("--data-dir", "SFWPRUNE_DATA", "apt-get install dataset-fashion-mnist",
                   "download=True", str(tmp_path / "nowhere")):  # fmt: skip
        assert needle in msg


def test_incomplete_folder_is_reported(tmp_path, files):
    files.write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete, missing t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_download_only_when_allowed(tmp_path, monkeypatch, files):
    calls = []

    def fake_download(dest):
        calls.append(dest)
        files.write_fashion(dest, n_train=9)

    monkeypatch.setattr(fm, "_download", fake_download)
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist")
    assert calls == []
    ds = load_dataset("fashion-mnist", download=True)
    assert ds.train_x.shape[0] == 9 and len(calls) == 1
    assert calls[0].parent.name == "sfwprune"
    # the cache is found on the next call without downloading again
    assert load_dataset("fashion-mnist").train_x.shape[0] == 9 and len(calls) == 1


def test_truncated_gzip_names_the_file(tmp_path, files):
    files.write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_truncated_data_names_the_file(tmp_path, files):
    files.write_fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_wrong_magic_names_the_file(tmp_path, files):
    files.write_fashion(tmp_path)
    labels = np.zeros(12, dtype=np.uint8)
    # a labels file where the images belong
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(files.idx_bytes(labels, files.LABELS_MAGIC))
    )
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz.*magic number 2049"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    with pytest.raises(ValueError, match="bad magic number"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_label_count_mismatch(tmp_path, files):
    files.write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(files.idx_bytes(np.zeros(11, dtype=np.uint8), files.LABELS_MAGIC))
    )
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz.*11 labels for 12 images"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_limit_and_image_size(tmp_path, files):
    files.write_fashion(tmp_path, n_train=12, n_test=5)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, limit=10)
    assert ds.train_x.shape[0] == 10 and ds.test_x.shape[0] == 2
    with pytest.raises(ValueError, match="Invalid image_size: 32"):
        load_dataset("fashion-mnist", data_dir=tmp_path, image_size=32)
    with pytest.raises(ValueError, match="Invalid limit: 0"):
        load_dataset("fashion-mnist", data_dir=tmp_path, limit=0)


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="no Debian copy")
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", DEBIAN)
    ds = load_dataset("fashion-mnist")
    assert ds.source.path == str(DEBIAN)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 1000))
    # the published statistics of Fashion-MNIST's training images
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-4)
