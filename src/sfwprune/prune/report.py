"""How sparse a model is, per tensor and in total, and what that saves in multiply-accumulates.

Compression ratio = parameters / nonzero parameters. For a conv or linear layer applied at ``P``
output positions (``H_out·W_out`` for a 2-d conv, 1 for a plain linear layer), dense MACs are
``P·numel(W)`` and nonzero MACs ``P·nnz(W)``; theoretical speedup = dense / nonzero MACs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .masks import prunable_parameters


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.inf


def _count_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``{weight name: (dense MACs, nonzero MACs)}`` for one sample of ``input_shape``."""
    if not isinstance(input_shape, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
    ):
        raise ValueError(
            f"Invalid input_shape: {input_shape!r} (expected positive ints, no batch dimension)"
        )
    names = {id(m): n for n, m in model.named_modules()}
    macs: dict[str, tuple[int, int]] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        w = module.weight
        # W is (out, in, ...) applied at each output position, or for a transposed conv
        # (in, out/groups, ...) applied at each input position; the batch is 1
        transposed = isinstance(module, _ConvNd) and module.transposed
        positions = (inputs[0] if transposed else output).numel() // w.shape[0]
        dense, nonzero = positions * w.numel(), positions * int(torch.count_nonzero(w))
        key = f"{names[id(module)]}.weight".lstrip(".")
        old = macs.get(key, (0, 0))  # a module called twice counts twice
        macs[key] = (old[0] + dense, old[1] + nonzero)

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, _ConvNd))]
    handles = [m.register_forward_hook(hook) for m in layers]
    flags = [(m, m.training) for m in model.modules()]
    ref = next(model.parameters(), torch.empty(0))
    try:
        model.eval()  # eval: no BatchNorm statistic is touched
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
    return macs


@torch.no_grad()
def sparsity_report(model: nn.Module, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Per-tensor sparsity and totals; with ``input_shape``, dense vs nonzero MACs.

    Args:
        model: any network (not modified).
        input_shape: one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``;
            if given, one forward pass in eval mode counts the MACs of conv and linear layers.

    Returns:
        ``{"layers": [row, ...], "totals": {...}}``. Each row: ``name``, ``shape``, ``numel``,
        ``zeros``, ``sparsity``, ``prunable`` (a conv/linear weight), and with ``input_shape``
        ``macs`` / ``nonzero_macs`` on weight rows. Totals: ``params``, ``nonzero``, ``zeros``,
        ``sparsity``, ``compression_ratio`` (params / nonzero), ``weight_params``,
        ``weight_nonzero``, ``weight_sparsity`` (conv/linear weights only), and with
        ``input_shape`` ``macs``, ``nonzero_macs``, ``theoretical_speedup``.

    Example:
        >>> rep = sparsity_report(net, input_shape=(1, 28, 28))
        >>> print(format_report(rep))
    """
    try:
        weights = {name for name, _ in prunable_parameters(model, "weights")}
    except ValueError:
        weights = set()
    macs = _count_macs(model, input_shape) if input_shape is not None else {}
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
    if input_shape is not None:
        dense = sum(d for d, _ in macs.values())
        nonzero = sum(n for _, n in macs.values())
        totals.update(macs=dense, nonzero_macs=nonzero, theoretical_speedup=_ratio(dense, nonzero))
    return {"layers": rows, "totals": totals}


def _fmt_int(n: int) -> str:
    return f"{n:,}"


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
            f"{r['sparsity']:.2%}",
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
        f"sparsity {t['sparsity']:.2%} (conv/linear weights {t['weight_sparsity']:.2%}), "
        f"compression {t['compression_ratio']:.2f}x"
    )
    if with_macs:
        lines.append(
            f"MACs per sample: {_fmt_int(t['macs'])} dense, {_fmt_int(t['nonzero_macs'])} nonzero, "
            f"theoretical speedup {t['theoretical_speedup']:.2f}x"
        )
    return "\n".join(lines)
