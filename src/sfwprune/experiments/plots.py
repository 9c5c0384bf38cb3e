"""Figures: accuracy vs sparsity, and the weight-magnitude histogram (paper Fig. 1-style)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=suffix, dpi=130, bbox_inches="tight")
    return _io.atomic_write_bytes(path, buf.getvalue())


def plot_accuracy_vs_sparsity(
    curves: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | Path,
    *,
    title: str = "Accuracy after one-shot pruning (no retraining)",
    bands: Sequence[Sequence[float] | None] | None = None,
) -> Path:
    """One line per ``(label, rows)``; x is sparsity on a logit-like axis, y accuracy (%).

    ``bands`` optionally gives a ± std per point for each curve.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, rows) in enumerate(curves):
        xs = [r["sparsity"] for r in rows]
        ys = [r["accuracy"] for r in rows]
        (line,) = ax.plot(range(len(xs)), ys, marker="o", label=label)
        if bands is not None and bands[i] is not None:
            lo = [y - s for y, s in zip(ys, bands[i])]
            hi = [y + s for y, s in zip(ys, bands[i])]
            ax.fill_between(range(len(xs)), lo, hi, color=line.get_color(), alpha=0.2)
    if curves:
        xs = [r["sparsity"] for r in curves[0][1]]
        ax.set_xticks(range(len(xs)), [f"{100 * s:g}%" for s in xs])
    ax.set_xlabel("sparsity (fraction of weights set to zero)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def weight_magnitudes(model: nn.Module) -> torch.Tensor:
    """All conv/linear weight magnitudes (tensors of dim >= 2), flattened, float64."""
    return torch.cat(
        [p.detach().abs().reshape(-1).double().cpu() for p in model.parameters() if p.dim() > 1]
    )


def plot_weight_histograms(models: Sequence[tuple[str, nn.Module]], path: str | Path) -> Path:
    """Left: histogram of ``|w| / max|w|``; right: sorted ``|w| / max|w|`` (where a global
    magnitude threshold falls at each sparsity). SFW's curve rises smoothly from many tiny
    weights; SGD's has few near zero, so pruning soon cuts into weights that matter."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, model in models:
        w = weight_magnitudes(model)
        w = w / w.max().clamp(min=1e-30)
        left.hist(w.numpy(), bins=100, histtype="step", density=True, label=label, log=True)
        srt = torch.sort(w).values
        frac = torch.linspace(0, 1, srt.numel(), dtype=torch.float64)
        step = max(1, srt.numel() // 4000)
        right.plot(frac[::step].numpy(), srt[::step].numpy(), label=label)
    left.set_xlabel("|w| / max |w|")
    left.set_ylabel("density (log)")
    left.set_title("weight magnitudes", fontsize=10)
    right.set_xlabel("sparsity (fraction of weights below threshold)")
    right.set_ylabel("pruning threshold |w| / max |w|")
    right.set_yscale("log")
    right.set_title("threshold of global magnitude pruning", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out
