"""2:4 export for torch.sparse.to_sparse_semi_structured: pattern, shapes, dtype; the GPU
benchmark's CPU-side preparation and its clean skip without CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from sfwprune.prune import prune_, semi_structured_state
from sfwprune.prune.semi_structured import follows_n_m, semi_structured_shape_ok

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # 64x128 and 32x64 meet fp16's (32, 64); the 10-class output layer cannot
    return nn.Sequential(
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def test_follows_n_m_hand_made() -> None:
    w = torch.tensor([[1.0, 0, 0, 2, 0, 0, 3, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    assert follows_n_m(w, 2, 4)
    assert not follows_n_m(w, 1, 4)
    w[1, 2] = 5.0  # three non-zeros in the first group of row 1
    assert not follows_n_m(w, 2, 4)
    assert not follows_n_m(torch.zeros(2, 6), 2, 4)  # 6 is not a multiple of 4
    conv = torch.zeros(3, 2, 2, 2)  # rows of C·kh·kw = 8
    conv[:, :, 0, 0] = 1.0
    assert follows_n_m(conv, 2, 4) and follows_n_m(conv, 1, 4)


def test_shape_constraints() -> None:
    assert semi_structured_shape_ok((32, 64), torch.float16)
    assert semi_structured_shape_ok((64, 128), torch.bfloat16)
    assert not semi_structured_shape_ok((32, 32), torch.float16)
    assert semi_structured_shape_ok((32, 32), torch.float32)
    assert not semi_structured_shape_ok((10, 64), torch.float16)
    assert not semi_structured_shape_ok((48, 64), torch.float16)
    assert not semi_structured_shape_ok((32, 64), torch.int8)


def test_state_after_2_4_pruning() -> None:
    net = _net()
    masks = prune_(net, structure="2:4")
    state = semi_structured_state(net)
    assert set(state) == {"0.weight", "2.weight"}  # "4.weight" (10 x 32) stays dense
    for name, w in state.items():
        assert w.dtype == torch.float16 and w.is_contiguous() and w.dim() == 2
        assert follows_n_m(w, 2, 4)
        # exactly the pruned weights, cast
        assert torch.equal(w, net.get_parameter(name).detach().to(torch.float16))
        assert torch.equal(w != 0, masks[name])  # random init: no kept weight is 0
    fp32 = semi_structured_state(net, dtype=torch.float32)  # 10 rows: under 32 for fp32 too
    assert set(fp32) == {"0.weight", "2.weight"} and fp32["0.weight"].dtype == torch.float32


def test_conv_weights_come_as_matrices() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 2), nn.ReLU(), nn.Conv2d(32, 32, 1))  # rows 64, 32
    prune_(net, structure="2:4")
    state = semi_structured_state(net)
    assert set(state) == {"0.weight"} and state["0.weight"].shape == (32, 64)
    assert set(semi_structured_state(net, dtype=torch.float32)) == {"0.weight", "2.weight"}


def test_unpruned_model_and_bad_dtype_raise() -> None:
    with pytest.raises(ValueError, match=r"Invalid weights: '0.weight' does not follow 2:4"):
        semi_structured_state(_net())
    net = _net()
    prune_(net, structure="2:4")
    with pytest.raises(ValueError, match=r"Invalid dtype: torch.int8"):
        semi_structured_state(net, dtype=torch.int8)
    prune_(net, structure="3:4")  # the same model at 3:4 after 2:4 is still 2:4
    assert set(semi_structured_state(net)) == {"0.weight", "2.weight"}


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_prepares_2_4_weights_on_cpu() -> None:
    bench = _bench()
    for _, out_f, in_f, _rows in bench.SPARSE_SHAPES:
        assert semi_structured_shape_ok((out_f, in_f), torch.float16)
    w, x = bench.prepare_2_4(64, 128, 16)
    assert w.shape == (64, 128) and x.shape == (16, 128)
    assert w.dtype == x.dtype == torch.float16
    assert follows_n_m(w, 2, 4)
    assert int((w != 0).sum()) == 64 * 128 // 2
    # the dense reference the GPU section compares against is the pruned weight's product
    ref = x.double() @ w.double().T
    assert torch.allclose(torch.nn.functional.linear(x.float(), w.float()).double(), ref, atol=1e-3)


def test_gpu_check_2_4_section_skips_without_cuda(capsys) -> None:
    bench = _bench()
    assert "skipped" in bench.sparse_2_4_section(torch.device("cpu"))
    assert bench.main(["--device", "cpu", "--sections", "2:4"]) == 0
    assert '"skipped": "no CUDA device (device cpu)"' in capsys.readouterr().out
