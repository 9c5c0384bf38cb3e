"""SparseLinear / to_sparse_inference: same outputs as dense, converted only where asked."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from sfwprune.prune import SparseLinear, prune_, to_sparse_inference


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_shape", [(), (1,), (7,), (2, 3)])
def test_sparse_linear_matches_dense(bias, dtype, batch_shape):
    torch.manual_seed(0)
    dense = nn.Linear(50, 20, bias=bias).to(dtype)
    prune_(dense, 0.9)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(*batch_shape, 50, dtype=dtype)
    with torch.no_grad():
        want = dense(x)
        got = sparse(x)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want)
    assert sparse.weight.layout == torch.sparse_csr and sparse.weight._nnz() == 100


def test_sparse_linear_survives_deepcopy_state_dict_and_dtype_moves():
    torch.manual_seed(0)
    dense = nn.Linear(30, 8)
    prune_(dense, 0.8)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(4, 30)
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(copy.deepcopy(sparse)(x), want)
        twin = copy.deepcopy(sparse)
        twin.values.zero_()  # in place: the cached CSR sees it
        assert twin(x).eq(dense.bias).all()
        torch.testing.assert_close(sparse(x), want)  # the original is independent
        as64 = copy.deepcopy(sparse).double()
        torch.testing.assert_close(as64(x.double()), want.double())
    assert set(sparse.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}


@pytest.mark.parametrize("sparsity", [0.9, 0.98, 0.99])
def test_converted_lenet_matches_dense(make_lenet300, sparsity):
    model = make_lenet300()
    prune_(model, sparsity, scope="layer")
    fast = to_sparse_inference(model, min_sparsity=0.5, min_numel=0)
    assert [type(m) for m in fast if not isinstance(m, (nn.ReLU, nn.Flatten))] == [SparseLinear] * 3
    assert all(type(m) is not SparseLinear for m in model)  # the original is untouched
    for batch in (1, 256):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_only_large_sparse_float_layers_are_converted():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(400, 300), nn.Linear(300, 10))
    model = nn.Sequential(inner, nn.Linear(10, 10).double())
    prune_(inner[0], 0.97)
    prune_(inner[1], 0.9)
    prune_(model[1], 0.99)
    fast = to_sparse_inference(model, min_sparsity=0.95, min_numel=1000)
    assert isinstance(fast[0][0], SparseLinear)  # 120k entries, 97% zeros
    assert type(fast[0][1]) is nn.Linear  # 3000 entries, only 90% zeros
    assert type(fast[1]) is nn.Linear  # 100 entries: too small
    assert not fast.training
    fast = to_sparse_inference(model, min_sparsity=0.98, min_numel=0)
    assert type(fast[0][0]) is nn.Linear and type(fast[0][1]) is nn.Linear
    assert isinstance(fast[1], SparseLinear)  # float64 is supported


def test_bare_linear_and_defaults(lenet300):
    prune_(lenet300, 0.98)  # global: the 784x300 layer ends up > 98% sparse
    fast = to_sparse_inference(lenet300)
    assert isinstance(fast[1], SparseLinear) and type(fast[5]) is nn.Linear
    layer = nn.Linear(500, 500)
    prune_(layer, 0.99)
    assert isinstance(to_sparse_inference(layer), SparseLinear)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_sparsity": 1.2}, "Invalid min_sparsity: 1.2"),
        ({"min_numel": -1}, "Invalid min_numel: -1"),
        ({"min_numel": 2.5}, "Invalid min_numel: 2.5"),
    ],
)
def test_bad_arguments_raise(lenet300, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        to_sparse_inference(lenet300, **kwargs)


def test_sparse_linear_rejects_half_weights():
    with pytest.raises(ValueError, match="Invalid weight"):
        SparseLinear(torch.zeros(3, 4, dtype=torch.float16))


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.Linear(16, 32), layer, nn.Linear(32, 10))


def test_transformer_linears_are_left_dense_and_the_copy_runs_in_eval():
    # TransformerEncoderLayer's eval fast path (aten::_transformer_encoder_layer_fwd) and
    # MultiheadAttention's out_proj take the weights themselves: no CSR kernel exists there
    model = _transformer()
    prune_(model, 0.9, scope="layer")
    fast = to_sparse_inference(model, min_sparsity=0.5, min_numel=0)
    assert isinstance(fast[0], SparseLinear) and isinstance(fast[2], SparseLinear)
    layer = fast[1]
    for inner in (layer.linear1, layer.linear2, layer.self_attn.out_proj):
        assert type(inner) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    x = torch.randn(3, 5, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert not fast.training


def test_multihead_attention_in_user_code_is_left_alone():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(24, 3, batch_first=True)
            self.head = nn.Linear(24, 24)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(1)
    model = Block()
    prune_(model, 0.9, scope="layer")
    fast = to_sparse_inference(model, min_sparsity=0.5, min_numel=0)
    assert isinstance(fast.head, SparseLinear) and not isinstance(fast.attn.out_proj, SparseLinear)
    x = torch.randn(2, 4, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_example_input_keeps_layers_whose_weight_is_used_directly_dense():
    class Flipped(nn.Module):  # reads fc.weight itself instead of calling fc
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 30)
            self.out = nn.Linear(30, 30)

        def forward(self, x):
            return self.out(nn.functional.linear(x, self.fc.weight.flip(0), self.fc.bias))

    torch.manual_seed(2)
    model = Flipped()
    prune_(model, 0.9, scope="layer")
    x = torch.randn(4, 20)
    with pytest.raises(NotImplementedError):  # the static rule cannot see into forward
        to_sparse_inference(model, min_sparsity=0.5, min_numel=0)(x)
    fast = to_sparse_inference(model, min_sparsity=0.5, min_numel=0, example_input=x)
    assert type(fast.fc) is nn.Linear and isinstance(fast.out, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
