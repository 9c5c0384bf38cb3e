"""How sparse a model is, per tensor and in total, and what that saves in multiply-accumulates.

Compression ratio = parameters / nonzero parameters. For a conv or linear layer applied at ``P``
output positions (``H_out·W_out`` for a 2-d conv, 1 for a plain linear layer), dense MACs are
``P·numel(W)`` and nonzero MACs ``P·nnz(W)``; theoretical speedup = dense / nonzero MACs.
"Weights" are :mod:`sfwprune.params`'s: every parameter of dim >= 2 (what ``prune_`` prunes).
MACs are counted for conv and linear modules that are called as modules; embeddings (lookups)
and weights used inside fused kernels (``nn.MultiheadAttention``'s projections) add none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..params import weight_parameters


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.inf


def _example(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None,
    input_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, ...] | None:
    """The forward's positional arguments (batch of one from ``input_shape``), or ``None``."""
    if example_input is not None:
        if input_shape is not None:
            raise ValueError("Invalid arguments: pass input_shape or example_input, not both")
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        if not args or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in args):
            raise ValueError(
                f"Invalid example_input: {type(example_input).__name__} (expected a tensor with "
                "a batch dimension, or a tuple of them)"
            )
        return args
    if input_shape is None:
        return None
    if not isinstance(input_shape, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
    ):
        raise ValueError(
            f"Invalid input_shape: {input_shape!r} (expected positive ints, no batch dimension)"
        )
    ref = next(model.parameters(), torch.empty(0))
    if input_dtype is not None and not isinstance(input_dtype, torch.dtype):
        raise ValueError(f"Invalid input_dtype: {input_dtype!r} (expected a torch.dtype)")
    dtype = input_dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
    # zeros: a valid image and a valid token id (0) alike
    return (torch.zeros(1, *input_shape, dtype=dtype, device=ref.device),)


def _count_macs(model: nn.Module, args: tuple[torch.Tensor, ...]) -> dict[str, tuple[int, int]]:
    """``{weight name: (dense MACs, nonzero MACs)}`` per sample of the batch ``args``."""
    names = {id(m): n for n, m in model.named_modules()}
    macs: dict[str, tuple[int, int]] = {}
    batch = max(1, args[0].shape[0])

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        w = module.weight
        # W is (out, in, ...) applied at each output position, or for a transposed conv
        # (in, out/groups, ...) applied at each input position
        transposed = isinstance(module, _ConvNd) and module.transposed
        positions = (inputs[0] if transposed else output).numel() // w.shape[0] // batch
        dense, nonzero = positions * w.numel(), positions * int(torch.count_nonzero(w))
        key = f"{names[id(module)]}.weight".lstrip(".")
        old = macs.get(key, (0, 0))  # a module called twice counts twice
        macs[key] = (old[0] + dense, old[1] + nonzero)

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, _ConvNd))]
    handles = [m.register_forward_hook(hook) for m in layers]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # eval: no BatchNorm statistic is touched
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
    return macs


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    input_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Per-tensor sparsity and totals; with ``input_shape`` or ``example_input``, MACs.

    Args:
        model: any network (not modified).
        input_shape: one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``;
            if given, one forward pass in eval mode on zeros counts the MACs of conv and linear
            layers.
        example_input: instead of ``input_shape``, a real batch (a tensor, or a tuple of the
            forward's positional tensors), e.g. token ids; MACs are per sample of its batch.
        input_dtype: dtype of the zeros built from ``input_shape`` (``torch.long`` for token
            ids); default the model's floating dtype.

    Returns:
        ``{"layers": [row, ...], "totals": {...}}``. Each row: ``name``, ``shape``, ``numel``,
        ``zeros``, ``sparsity``, ``prunable`` (a weight, dim >= 2), and with an input
        ``macs`` / ``nonzero_macs`` on weight rows. Totals: ``params``, ``nonzero``, ``zeros``,
        ``sparsity``, ``compression_ratio`` (params / nonzero), ``weight_params``,
        ``weight_nonzero``, ``weight_sparsity`` (weights only), and with an input ``macs``,
        ``nonzero_macs``, ``theoretical_speedup`` (``inf`` when no MAC is left).

    Example:
        >>> rep = sparsity_report(net, input_shape=(1, 28, 28))
        >>> print(format_report(rep))
    """
    weights = {name for name, _ in weight_parameters(model)}
    args = _example(model, input_shape, example_input, input_dtype)
    macs = _count_macs(model, args) if args is not None else {}
    rows = []
    for name, p in model.named_parameters():
        numel = p.numel()
        zeros = numel - int(torch.count_nonzero(p))
        row: dict[str, Any] = {
            "name": name,
            "shape": list(p.shape),
            "numel": numel,
            "zeros": zeros,
            "sparsity": _ratio(zeros, numel) if numel else 0.0,
            "prunable": name in weights,
        }
        if name in macs:
            row["macs"], row["nonzero_macs"] = macs[name]
        rows.append(row)
    params = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    w_params = sum(r["numel"] for r in rows if r["prunable"])
    w_zeros = sum(r["zeros"] for r in rows if r["prunable"])
    totals: dict[str, Any] = {
        "params": params,
        "nonzero": params - zeros,
        "zeros": zeros,
        "sparsity": _ratio(zeros, params) if params else 0.0,
        "compression_ratio": _ratio(params, params - zeros),
        "weight_params": w_params,
        "weight_nonzero": w_params - w_zeros,
        "weight_sparsity": _ratio(w_zeros, w_params) if w_params else 0.0,
    }
    if args is not None:
        dense = sum(d for d, _ in macs.values())
        nonzero = sum(n for _, n in macs.values())
        totals.update(macs=dense, nonzero_macs=nonzero, theoretical_speedup=_ratio(dense, nonzero))
    return {"layers": rows, "totals": totals}


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def format_sparsity(sparsity: float) -> str:
    """A fraction of zeros as a percentage with as many decimals (2 to 8) as it takes for a
    value strictly between 0 and 1 never to print as 0% or 100%.

    Example:
        >>> format_sparsity(0.9), format_sparsity(0.9999), format_sparsity(0.99999)
        ('90.00%', '99.99%', '99.999%')
    """
    value = float(sparsity)
    if not 0.0 < value < 1.0:
        return f"{100 * value:.2f}%"
    for decimals in range(2, 9):
        text = f"{100 * value:.{decimals}f}"
        if float(text) not in (0.0, 100.0):
            return f"{text}%"
    return ">99.999999%" if value > 0.5 else "<0.000001%"


def format_ratio(ratio: float, what: str = "") -> str:
    """``12.34x``, or for ``inf`` (nothing nonzero left) a phrase instead of ``infx``."""
    if math.isinf(ratio):
        return f"unbounded (no nonzero {what or 'entries'} left)"
    return f"{ratio:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`sparsity_report`'s result (for the CLI)."""
    with_macs = "macs" in report["totals"]
    head = ["name", "shape", "numel", "zeros", "sparsity"] + (["MACs", "nonzero MACs"] * with_macs)
    body = []
    for r in report["layers"]:
        line = [
            r["name"],
            "x".join(map(str, r["shape"])) or "scalar",
            _fmt_int(r["numel"]),
            _fmt_int(r["zeros"]),
            format_sparsity(r["sparsity"]),
        ]
        if with_macs:
            line += [_fmt_int(r["macs"]), _fmt_int(r["nonzero_macs"])] if "macs" in r else ["", ""]
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    right = {i for i, h in enumerate(head) if h not in ("name", "shape")}

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    t = report["totals"]
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    lines.append(
        f"total: {_fmt_int(t['params'])} params, {_fmt_int(t['nonzero'])} nonzero, "
        f"sparsity {format_sparsity(t['sparsity'])} "
        f"(weights {format_sparsity(t['weight_sparsity'])}), "
        f"compression {format_ratio(t['compression_ratio'], 'parameters')}"
    )
    if with_macs:
        lines.append(
            f"MACs per sample: {_fmt_int(t['macs'])} dense, {_fmt_int(t['nonzero_macs'])} nonzero, "
            f"theoretical speedup {format_ratio(t['theoretical_speedup'], 'MACs')}"
        )
    return "\n".join(lines)
