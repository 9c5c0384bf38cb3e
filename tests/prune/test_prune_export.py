"""save_pruned / load_pruned: exact round trips, size, weights_only, clear errors."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from sfwprune.prune import load_pruned, prune_, save_pruned


def pruned_convbn(make_convbn, seed: int = 0) -> nn.Module:
    model = make_convbn(seed)
    prune_(model, 0.8)
    with torch.no_grad():  # non-trivial buffers
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(17)
    return model


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("compression", ["zlib", "lzma"])
def test_float32_round_trip_is_exact(tmp_path, make_convbn, compression):
    model = pruned_convbn(make_convbn)
    path = save_pruned(model, tmp_path / "m.pt", compression=compression)
    fresh = make_convbn(seed=1)
    assert load_pruned(path, fresh) is fresh
    assert_state_equal(model, fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary left behind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_is_exact_at_the_saved_dtype(tmp_path, make_lenet300, dtype):
    model = make_lenet300()
    prune_(model, 0.9)
    save_pruned(model, tmp_path / "m.pt", dtype=dtype)
    fresh = load_pruned(tmp_path / "m.pt", make_lenet300(seed=1))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert q.dtype == torch.float32
        assert torch.equal(q, p.detach().to(dtype).float()), name


def test_file_loads_with_weights_only(tmp_path, convbn):
    save_pruned(convbn, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["format"] == "sfwprune.pruned" and obj["version"] == 1
    assert obj["mask"].dtype == torch.uint8 and obj["values"].dtype == torch.uint8


def test_file_under_a_tenth_of_dense_state_dict_at_95_percent(tmp_path, lenet300):
    prune_(lenet300, 0.95)
    buf = io.BytesIO()
    torch.save(lenet300.state_dict(), buf)
    size = save_pruned(lenet300, tmp_path / "m.pt").stat().st_size
    assert size < len(buf.getvalue()) / 10, (size, len(buf.getvalue()))


def test_tied_weights_round_trip(tmp_path):
    def tied():
        lin = nn.Linear(6, 6)
        return nn.Sequential(lin, nn.ReLU(), lin)

    torch.manual_seed(0)
    model = tied()
    prune_(model, 0.5)
    fresh = tied()
    load_pruned(save_pruned(model, tmp_path / "t.pt"), fresh)
    assert fresh[0] is fresh[2]
    assert_state_equal(model, fresh)


def test_mismatched_model_raises_and_is_left_unchanged(tmp_path, lenet300):
    path = save_pruned(lenet300, tmp_path / "m.pt")
    other = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 100), nn.ReLU()
    )
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match=r"shape mismatch: \['1.weight: file \[300, 784\]"):
        load_pruned(path, other)
    with pytest.raises(ValueError, match=re.escape("not in model: ['5.weight', '5.bias']")):
        load_pruned(path, other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
    with pytest.raises(ValueError, match=re.escape("missing in file: ['6.weight', '6.bias']")):
        load_pruned(path, nn.Sequential(*list(lenet300), nn.BatchNorm1d(10)))
    path = save_pruned(nn.Sequential(*list(lenet300), nn.BatchNorm1d(10, affine=False)), path)
    with pytest.raises(ValueError, match=r"buffers do not match .*model: \['6.running_mean'"):
        load_pruned(path, lenet300)


def test_wrong_version_or_not_a_pruned_file_raises(tmp_path, lenet300):
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a save_pruned file"):
        load_pruned(tmp_path / "plain.pt", lenet300)
    obj = torch.load(save_pruned(lenet300, tmp_path / "m.pt"), weights_only=True)
    torch.save({**obj, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="format version 99"):
        load_pruned(tmp_path / "v99.pt", lenet300)
    torch.save({k: v for k, v in obj.items() if k != "dense"}, tmp_path / "nodense.pt")
    with pytest.raises(ValueError, match="corrupt: no dense"):
        load_pruned(tmp_path / "nodense.pt", lenet300)
    torch.save({**obj, "values": obj["values"][:-10]}, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="corrupt data"):
        load_pruned(tmp_path / "cut.pt", lenet300)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": torch.int8}, "Invalid dtype: torch.int8"),
        ({"dtype": "float16"}, "Invalid dtype: 'float16'"),
        ({"compression": "gzip"}, "Invalid compression: 'gzip'"),
    ],
)
def test_bad_save_options_raise(tmp_path, lenet300, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        save_pruned(lenet300, tmp_path / "m.pt", **kwargs)
    assert not (tmp_path / "m.pt").exists()
