"""Tiny-ImageNet: a small real-layout tree of JPEGs, val regrouped from val_annotations.txt."""

from __future__ import annotations

import pytest
import torch

from sfwprune.data import cache_dir, load_dataset


def _colour_labels(x: torch.Tensor, colours) -> list[int]:
    """Nearest class colour of each (solid-colour) image."""
    means = x.float().mean(dim=(2, 3))  # N×3
    table = torch.tensor(colours, dtype=torch.float32)  # K×3
    return torch.cdist(means, table).argmin(dim=1).tolist()


def test_layout_labels_and_resize(tmp_path, files):
    wnids = files.write_tiny_imagenet(tmp_path, n_train=4, n_val=2)
    ds = load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.num_classes == 3 and ds.classes == tuple(wnids)
    assert ds.train_x.shape[0] == 12 and ds.test_x.shape[0] == 6
    # round-robin class order, so any prefix is balanced
    assert ds.train_y.tolist() == [0, 1, 2] * 4 and ds.test_y.tolist() == [0, 1, 2] * 2
    # labels agree with the pixels: train from the folder, val from the annotations
    train_colour = _colour_labels(ds.train_x, files.TINY_COLORS)
    gray = ds.train_y.tolist().index(1)  # class 1's first image is the greyscale one
    assert torch.equal(ds.train_x[gray, 0], ds.train_x[gray, 2])  # converted to RGB
    assert [c for i, c in enumerate(train_colour) if i != gray] == [
        y for i, y in enumerate(ds.train_y.tolist()) if i != gray
    ]
    assert _colour_labels(ds.test_x, files.TINY_COLORS) == ds.test_y.tolist()


def test_native_64_and_limit(tmp_path, files):
    files.write_tiny_imagenet(tmp_path)
    ds = load_dataset("tiny-imagenet", data_dir=tmp_path / "tiny-imagenet-200", image_size=64)
    assert ds.input_shape == (3, 64, 64)
    small = load_dataset("tiny-imagenet", data_dir=tmp_path, limit=5)
    assert small.train_y.tolist() == [0, 1, 2, 0, 1] and small.test_x.shape[0] == 1
    with pytest.raises(ValueError, match="Invalid image_size: 0"):
        load_dataset("tiny-imagenet", data_dir=tmp_path, image_size=0)


def test_decode_cache_reused_and_invalidated(tmp_path, files):
    from PIL import Image

    files.write_tiny_imagenet(tmp_path)
    first = load_dataset("tiny-imagenet", data_dir=tmp_path)
    cached = list(cache_dir().glob("tiny-imagenet-32px-*.pt"))
    assert len(cached) == 1 and "decoded cache" not in first.source.note
    second = load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert "decoded cache" in second.source.note
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    # a new image changes the fingerprint, so the folder is decoded again
    images = tmp_path / "tiny-imagenet-200" / "train" / "n01443537" / "images"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(images / "n01443537_99.JPEG")
    third = load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert third.train_x.shape[0] == 13 and "decoded cache" not in third.source.note
    no_cache = load_dataset("tiny-imagenet", data_dir=tmp_path, image_size=16, cache=False)
    assert no_cache.input_shape == (3, 16, 16)
    assert not list(cache_dir().glob("tiny-imagenet-16px-*.pt"))


def test_bad_annotation_and_bad_image(tmp_path, files):
    files.write_tiny_imagenet(tmp_path)
    top = tmp_path / "tiny-imagenet-200"
    annotations = top / "val" / "val_annotations.txt"
    good = annotations.read_text()
    annotations.write_text(good + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt.*line 7"):
        load_dataset("tiny-imagenet", data_dir=tmp_path)
    annotations.write_text(good)
    bad = top / "train" / "n01629819" / "images" / "n01629819_2.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="n01629819_2.JPEG"):
        load_dataset("tiny-imagenet", data_dir=tmp_path)


def test_not_found_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)tiny-imagenet-200.zip.*SFWPRUNE_DATA"):
        load_dataset("tiny-imagenet")
    with pytest.raises(FileNotFoundError, match=r"Invalid data_dir: .*wnids.txt"):
        load_dataset("tiny-imagenet", data_dir=tmp_path)
