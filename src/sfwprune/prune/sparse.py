"""Sparse CPU inference: linear layers with a CSR weight, used where they beat the dense layer.

``y = x Wᵀ + b`` computed as ``(b 1ᵀ + W xᵀ)ᵀ`` with ``W`` in compressed sparse row form, so the
work is ``nnz(W)`` multiply-adds per sample instead of ``numel(W)``. A sparse product has a fixed
cost per call (about 15 µs on one CPU thread with MKL), so it only pays for large, very sparse
layers: see ``benchmarks/sparse_inference.py`` for the measurements behind the defaults.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .masks import check_sparsity

Tensor = torch.Tensor

# benchmarks/sparse_inference.py, one thread (Xeon, torch 2.11; dense/CSR time, >1 = CSR faster):
#   784x300:   s=0.9: 0.56 (batch 1) 1.55 (batch 256); s=0.95: 0.82 / 2.3; s=0.99: 1.14 / 3.15
#   1000x1000: s=0.9: 1.37 / 1.92; s=0.95: 2.4 / 3.3; s=0.99: 5.4 / 6.9
#   300x100 (30k weights): never faster at batch 1 (0.47), 1.0-1.4 at batch 256 from s=0.9
#   100x10: never faster. Hence: large layers (>= 100k weights) at >= 95% zeros.
DEFAULT_MIN_SPARSITY = 0.95
DEFAULT_MIN_NUMEL = 100_000
_SPARSE_DTYPES = (torch.float32, torch.float64)


def _csr_parts(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)`` of ``weight``, with int32 indices when they fit:
    MKL's sparse kernels take int32, and int64 indices would be converted on every call."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta" is not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
    crow, col, values = csr.crow_indices(), csr.col_indices(), csr.values()
    if max(weight.shape) < 2**31 and values.numel() < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return crow.clone(), col.clone(), values.clone()


class SparseLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is a ``torch.sparse_csr`` tensor.

    Outputs equal the dense layer's up to float rounding (sums in a different order). The CSR
    parts and the bias are plain buffers (no gradients), so ``.to(device)``, ``deepcopy`` and
    ``state_dict`` work; the CSR tensor itself is assembled from them and cached.

    Example:
        >>> dense = nn.Linear(784, 300)
        >>> _ = prune_(dense, 0.98)
        >>> y = SparseLinear.from_dense(dense)(torch.randn(8, 784))
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.dtype not in _SPARSE_DTYPES:
            raise ValueError(
                f"Invalid weight: shape {tuple(weight.shape)}, {weight.dtype} "
                "(expected a 2-d float32 or float64 tensor)"
            )
        self.out_features, self.in_features = weight.shape
        crow, col, values = _csr_parts(weight)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        # bias as a column (out, 1): addmm broadcasts it over the batch
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1, 1).clone())
        self._csr: Tensor | None = None
        self._csr_key: tuple | None = None

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> SparseLinear:
        """The sparse twin of ``layer`` (same weight values, zeros dropped)."""
        return cls(layer.weight, layer.bias)

    @property
    def weight(self) -> Tensor:
        """The weight as a CSR tensor, rebuilt only when the buffers moved or changed."""
        key = (self.crow_indices.data_ptr(), self.col_indices.data_ptr(), self.values.data_ptr())
        if self._csr is None or key != self._csr_key:
            self._csr = torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                self.values,
                (self.out_features, self.in_features),
                check_invariants=True,  # once per rebuild: buffers may come from a state_dict
            )
            self._csr_key = key
        return self._csr

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t()  # (in, batch)
        if self.bias is None:
            y = torch.mm(self.weight, xt)
        else:
            y = torch.addmm(self.bias, self.weight, xt)  # (out, batch)
        return y.t().reshape(*lead, self.out_features)

    def __getstate__(self) -> dict:
        # the cached CSR tensor has no storage to copy or pickle; it is rebuilt from the buffers
        return {**self.__dict__, "_csr": None, "_csr_key": None}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.values.numel()}"
        )


# torch.nn containers call their children as modules. Any other torch.nn module may use a child
# Linear's weight directly or in a fused kernel (nn.MultiheadAttention passes out_proj.weight to
# F.multi_head_attention_forward, nn.TransformerEncoderLayer's eval fast path hands every weight
# to aten::_transformer_encoder_layer_fwd), where a CSR weight cannot go.
_CALLING_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def calls_children(module: nn.Module) -> bool:
    """Whether a child ``nn.Linear`` of ``module`` may be swapped for a :class:`SparseLinear`.

    True for torch's containers and for modules whose classes all come from outside ``torch``
    (user code, torchvision), which call their children; False for every other ``torch.nn``
    module and its subclasses (attention, transformer layers, RNNs ...), left dense.
    """
    if isinstance(module, _CALLING_CONTAINERS):
        return True
    return not any(
        cls.__module__.startswith("torch.")
        for cls in type(module).__mro__
        if cls not in (nn.Module, object)
    )


def to_sparse_inference(
    model: nn.Module,
    *,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    min_numel: int = DEFAULT_MIN_NUMEL,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    atol: float = 1e-4,
) -> nn.Module:
    """A copy of ``model`` whose sparse ``nn.Linear`` layers compute with a CSR weight.

    A layer is converted when its weight has ``sparsity >= min_sparsity`` and at least
    ``min_numel`` entries and is float32/float64, and when every module above it calls its
    children (:func:`calls_children`): linears inside ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer`` and other torch modules that use weights in fused kernels are
    left dense. With ``example_input``, each conversion is also checked by running: a layer whose
    conversion makes the model fail or change its output (beyond ``atol``, relative to the
    output's scale) stays dense, which covers user code that reads ``self.fc.weight`` itself.
    The defaults come from the benchmark on one CPU thread: there CSR beat dense at batch 256
    (2-7x) and broke even or won at batch 1, while smaller or denser layers lost at batch 1 to
    the sparse kernel's fixed cost. The original model is not changed.

    Args:
        model: a pruned network (e.g. after :func:`prune_`).
        min_sparsity: fraction of zeros a weight needs to be converted, in ``[0, 1]``.
        min_numel: smallest weight (in entries) worth converting.
        example_input: optional input (a tensor or a tuple of positional tensors) to verify
            each conversion on; costs one forward pass per candidate layer.
        atol: tolerance of that check.

    Returns:
        The converted copy, in eval mode.

    Example:
        >>> _ = prune_(net, 0.98)
        >>> fast = to_sparse_inference(net)
        >>> torch.allclose(fast(x), net(x), atol=1e-5)
        True
    """
    min_sparsity = check_sparsity(min_sparsity, "min_sparsity")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"Invalid min_numel: {min_numel!r} (expected an integer >= 0)")
    out = copy.deepcopy(model).eval()
    if isinstance(out, nn.Linear):
        if _worth_it(out.weight, min_sparsity, min_numel):
            return SparseLinear.from_dense(out).eval()
        return out

    candidates: list[tuple[nn.Module, str, nn.Linear]] = []

    def collect(module: nn.Module) -> None:
        if not calls_children(module):
            return
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and _worth_it(child.weight, min_sparsity, min_numel):
                candidates.append((module, name, child))
            else:
                collect(child)

    collect(out)
    if example_input is None:
        for parent, name, child in candidates:
            setattr(parent, name, SparseLinear.from_dense(child))
        return out
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        reference = out(*args)
        for parent, name, child in candidates:
            setattr(parent, name, SparseLinear.from_dense(child))
            if not _same_output(out, args, reference, atol):
                setattr(parent, name, child)
    return out


def _same_output(model: nn.Module, args: tuple, reference: object, atol: float) -> bool:
    try:
        got = model(*args)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    ref_t = [t for t in _tensors(reference)]
    got_t = [t for t in _tensors(got)]
    if len(ref_t) != len(got_t):
        return False
    for r, g in zip(ref_t, got_t, strict=True):
        if r.shape != g.shape or g.layout != torch.strided:
            return False
        scale = float(r.abs().max()) if r.numel() and r.is_floating_point() else 1.0
        if not torch.allclose(g.to(r.dtype), r, rtol=0.0, atol=atol * max(1.0, scale)):
            return False
    return True


def _tensors(obj: object) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _worth_it(weight: Tensor, min_sparsity: float, min_numel: int) -> bool:
    numel = weight.numel()
    if weight.dtype not in _SPARSE_DTYPES or numel == 0 or numel < min_numel:
        return False
    return 1.0 - int(torch.count_nonzero(weight)) / numel >= min_sparsity
