"""Stochastic Frank-Wolfe with momentum, as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..constraints import constraint_from_group
from ..constraints.groups import check_kind
from .fast import FastStepCache, sfw_step_fast
from .finite import NonFiniteGradientError, finite_flags
from .reference import sfw_group_step_reference

RESCALES = ("gradient", "diameter", None)


def _check_lr(lr: Any) -> float:
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (expected a number >= 0)")
    return float(lr)


def _check_momentum(momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"Invalid momentum: {momentum!r} (expected a number in [0, 1))")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum} (expected a number in [0, 1))")
    return float(momentum)


def _check_rescale(rescale: Any) -> str | None:
    if rescale not in RESCALES:
        raise ValueError(f"Invalid rescale: {rescale!r} (expected 'gradient', 'diameter' or None)")
    return rescale


class SFW(torch.optim.Optimizer):
    """Stochastic Frank-Wolfe with momentum (Lu et al. 2022, Algorithm 1).

    Each parameter tensor stays inside the convex set named by its param group::

        m ← ρ m + (1-ρ) g;   v = argmin_{v∈C} <m, v>;   θ ← θ + η (v - θ)

    with ``η = clamp(lr·||m||/||θ - v||, 0, 1)`` for ``rescale="gradient"``,
    ``clamp(lr/D, 0, 1)`` for ``"diameter"`` and ``clamp(lr, 0, 1)`` for ``None``.
    Groups without a ``constraint`` (e.g. ``model.parameters()``) are unconstrained and take
    ``θ ← θ - lr·m``.

    Args:
        params: tensors or param groups, typically from :func:`sfwprune.constraint_groups`.
            A group's set is plain values: ``constraint`` (kind), ``k``, ``p``, ``radius``.
        lr: learning rate (default 1.0, the paper's).
        momentum: ρ in [0, 1) (default 0.9).
        rescale: ``"gradient"`` (default), ``"diameter"`` or ``None``.
        check_finite: refuse (``ValueError``, nothing changed) a step whose gradients hold NaN
            or inf (default True). Costs one read of each gradient (on CPU, with the
            compiled kernel, while the gradient is still in cache); on CUDA also one host sync
            a step.
        diagnostics: when True, ``self.diagnostics`` holds, after each step, one dict per
            stepped tensor with ``name``, ``fw_gap`` (``<m, θ - v>``) and ``step_size`` (η)
            as 0-dim tensors. Off by default, and then free.
        foreach: which implementation steps: ``None`` (default) or ``True`` the fast path
            (:mod:`sfwprune.optim.fast`: multi-tensor, no dense K-sparse vertex, no host sync
            on GPU), ``False`` the plain per-tensor reference loop. Both give the same results
            up to rounding.
        cuda_graph: on CUDA, capture the fast path's batched K-sparse step once as a CUDA
            graph and replay it (one launch instead of hundreds; default True). Falls back to
            plain launches if capture fails.

    Example:
        >>> opt = SFW(constraint_groups(model), lr=1.0, momentum=0.9)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        *,
        momentum: float = 0.9,
        rescale: str | None = "gradient",
        diagnostics: bool = False,
        foreach: bool | None = None,
        check_finite: bool = True,
        cuda_graph: bool = True,
    ):
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"Invalid foreach: {foreach!r} (expected None, True or False)")
        self.foreach = foreach
        self._fast_cache = FastStepCache()
        self._fast_cache.use_graphs = bool(cuda_graph)
        defaults = {
            "lr": _check_lr(lr),
            "momentum": _check_momentum(momentum),
            "rescale": _check_rescale(rescale),
            "constraint": "unconstrained",
            "k": None,
            "p": None,
            "radius": None,
        }
        self.check_finite = bool(check_finite)
        self.track_diagnostics = bool(diagnostics)
        self.diagnostics: list[dict[str, Any]] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_lr(group["lr"])
        _check_momentum(group["momentum"])
        _check_rescale(group["rescale"])
        check_kind(group["constraint"])
        for p in group["params"]:
            n = group.get("n")
            if n is not None and n != p.numel():
                raise ValueError(
                    f"Invalid n: {n} for a parameter of {p.numel()} elements "
                    f"(group {group.get('name', len(self.param_groups) - 1)!r})"
                )
            constraint_from_group(group, p.numel())  # validates k, p, radius

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep our switches too.
        state = super().__getstate__()
        state.update(
            foreach=self.foreach, track_diagnostics=self.track_diagnostics,
            check_finite=self.check_finite, diagnostics=[],
            cuda_graph=self._fast_cache.use_graphs,
        )  # fmt: skip
        return state

    def _refuse_non_finite_gradients(self) -> None:
        """Raise before any state changes if a gradient holds NaN/inf (one host sync)."""
        grads, names = [], []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    grads.append(p.grad)
                    names.append(group.get("name", str(index)))
        if not grads:
            return
        finite = finite_flags(grads)
        if not bool(finite.all()):
            raise NonFiniteGradientError(names[int(torch.nonzero(~finite)[0])])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SFW step for every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        diagnostics: list[dict[str, Any]] | None = [] if self.track_diagnostics else None
        if getattr(self, "foreach", None) is not False:
            cache = getattr(self, "_fast_cache", None)
            if cache is None:  # e.g. an optimizer restored by pickle
                cache = self._fast_cache = FastStepCache()
                cache.use_graphs = getattr(self, "cuda_graph", True)
            # checks every gradient before it changes anything
            sfw_step_fast(self.param_groups, self.state, diagnostics, cache, self.check_finite)
            if diagnostics is not None:
                self.diagnostics = diagnostics
            return loss
        if self.check_finite:
            self._refuse_non_finite_gradients()
        for index, group in enumerate(self.param_groups):
            start = len(diagnostics) if diagnostics is not None else 0
            sfw_group_step_reference(group, self.state, diagnostics)
            if diagnostics is not None:
                for row in diagnostics[start:]:
                    row["name"] = group.get("name", str(index))
        if diagnostics is not None:
            self.diagnostics = diagnostics
        return loss
