"""Stochastic Frank-Wolfe with momentum, as a ``torch.optim.Optimizer``, and its dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..constraints import constraint_from_group
from ..constraints.groups import check_kind
from . import _cpu_kernel
from ._batched import batched_step_
from ._reference import reference_step_
from .finite import NonFiniteGradientError, finite_flags

RESCALES = ("gradient", "diameter", None)
_KERNEL_DTYPES = (torch.float32, torch.float64)
# The switches of the implementation, kept in every param group (like torch's foreach/fused).
SWITCHES = {"foreach": None, "fused": None, "cuda_graph": True, "check_finite": True,
            "diagnostics": False}  # fmt: skip


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


def _check_switches(group: dict[str, Any]) -> None:
    if group["rescale"] not in RESCALES:
        raise ValueError(
            f"Invalid rescale: {group['rescale']!r} (expected 'gradient', 'diameter' or None)"
        )
    for name in ("foreach", "fused"):
        if group[name] not in (None, True, False):
            raise ValueError(f"Invalid {name}: {group[name]!r} (expected None, True or False)")
    for name in ("cuda_graph", "check_finite", "diagnostics"):
        if not isinstance(group[name], bool):
            raise ValueError(f"Invalid {name}: {group[name]!r} (expected True or False)")
    if group["fused"] and group["foreach"] is False:
        raise ValueError("Invalid fused: True with foreach=False (the reference loop is not fused)")
    if group["fused"] and not _cpu_kernel.AVAILABLE:
        raise ValueError("Invalid fused: True (numba, which the compiled kernel needs, is missing)")
    if "weight_decay" in group:
        raise ValueError(
            f"Invalid weight_decay: {group['weight_decay']!r} (SFW takes none: the constraint "
            "set bounds the weights; remove the key)"
        )


def dispatch(
    param_groups: list[dict[str, Any]],
) -> tuple[list[tuple[int, dict, list]], list[tuple[dict, torch.Tensor]], list[tuple[dict, torch.Tensor]]]:  # fmt: skip
    """Which implementation steps each parameter with a gradient: ``(reference, kernel,
    batched)``. The rule, the only place it is written:

    1. the plain per-tensor loop (:mod:`._reference`) for a group with ``foreach=False``, with
       ``diagnostics=True`` (per-tensor FW gaps are the reference's), or whose ``constraint``
       is not ``"k_sparse"`` (every other set kind, present or future, and unconstrained);
    2. otherwise the compiled CPU kernel (:mod:`._cpu_kernel`) for a contiguous float32/float64
       CPU tensor, unless ``fused=False`` or numba is missing;
    3. otherwise the batched torch step (:mod:`._batched`): GPU tensors, half precision, other
       memory layouts, ``fused=False``.
    """
    reference, kernel, batched = [], [], []
    for index, group in enumerate(param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if (
            group.get("foreach") is False
            or group.get("diagnostics", False)
            or group.get("constraint") != "k_sparse"
        ):
            reference.append((index, group, params))
            continue
        fused = group.get("fused") is not False and _cpu_kernel.AVAILABLE
        for p in params:
            if fused and p.is_cpu and p.dtype in _KERNEL_DTYPES and p.is_contiguous():
                kernel.append((group, p))
            else:
                batched.append((group, p))
    return reference, kernel, batched


def _route(group: dict[str, Any]) -> tuple:
    """What :func:`dispatch` reads of a group (its tensors' part is checked by the kernel)."""
    return (id(group), group.get("foreach"), group.get("diagnostics", False),
            group.get("constraint"), group.get("fused"))  # fmt: skip


class SFW(torch.optim.Optimizer):
    """Stochastic Frank-Wolfe with momentum (Lu et al. 2022, Algorithm 1; docs/algorithm.md).

    Each parameter tensor stays inside the convex set named by its param group::

        m ← ρ m + (1-ρ) g;   v = argmin_{v∈C} <m, v>;   θ ← θ + η (v - θ)

    with ``η = clamp(lr·||m||/||θ - v||, 0, 1)`` for ``rescale="gradient"``,
    ``clamp(lr/D, 0, 1)`` for ``"diameter"`` and ``clamp(lr, 0, 1)`` for ``None``.
    Groups without a ``constraint`` (e.g. ``model.parameters()``) are unconstrained and take
    ``θ ← θ - lr·m`` (:func:`~sfwprune.constraint_groups` gives those groups their own
    ``lr``). There is no weight decay: a group with a ``weight_decay`` key is refused.

    Args:
        params: tensors or param groups, typically from :func:`sfwprune.constraint_groups`.
            A group's set is plain values: ``constraint`` (kind), ``k``, ``p``, ``radius``.
        lr: learning rate (default 1.0, the paper's).
        momentum: ρ in [0, 1) (default 0.9).
        rescale: ``"gradient"`` (default), ``"diameter"`` or ``None``.

    The implementation switches below are param-group defaults (a group may override them),
    so they survive ``state_dict()`` and pickling; :func:`dispatch` states the rule.

        foreach: ``None`` (default) or ``True``: K-sparse groups take a fast path (the
            compiled CPU kernel or the batched torch step); ``False``: the plain reference loop.
        fused: the compiled CPU kernel for K-sparse CPU tensors: ``None`` (default) when numba
            imports, ``True`` required (refused if numba is missing), ``False`` never (the
            batched torch step instead).
        cuda_graph: on CUDA, replay the batched step as a CUDA graph (default True).
        check_finite: refuse (``ValueError``, nothing changed) a step whose gradients hold NaN
            or inf (default True; one read of each gradient, on CUDA one host sync a step).
        diagnostics: when True, the group takes the reference loop and ``self.diagnostics``
            holds, after each step, one dict per stepped tensor with ``name``, ``fw_gap``
            (``<m, θ - v>``, None when unconstrained) and ``step_size`` (η), 0-dim tensors.

    All paths give the same results up to rounding (tested in float64 and float32).

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
        foreach: bool | None = None,
        fused: bool | None = None,
        cuda_graph: bool = True,
        check_finite: bool = True,
        diagnostics: bool = False,
    ):
        defaults = {
            "lr": _check_lr(lr),
            "momentum": _check_momentum(momentum),
            "rescale": rescale,
            "constraint": "unconstrained",
            "k": None,
            "p": None,
            "radius": None,
            "foreach": foreach,
            "fused": fused,
            "cuda_graph": cuda_graph,
            "check_finite": check_finite,
            "diagnostics": diagnostics,
        }
        self.diagnostics: list[dict[str, Any]] = []
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.diagnostics = []
        for group in self.param_groups:  # groups saved before a switch existed
            for name, value in SWITCHES.items():
                group.setdefault(name, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_lr(group["lr"])
        _check_momentum(group["momentum"])
        _check_switches(group)
        check_kind(group["constraint"])
        for p in group["params"]:
            n = group.get("n")
            if n is not None and n != p.numel():
                raise ValueError(
                    f"Invalid n: {n} for a parameter of {p.numel()} elements "
                    f"(group {group.get('name', len(self.param_groups) - 1)!r})"
                )
            constraint_from_group(group, p.numel())  # validates k, p, radius

    def _caches(self) -> dict[str, dict]:
        """Plans and work arrays of the fast paths; never change results, never saved."""
        caches = self.__dict__.get("_fast_caches")
        if caches is None:
            caches = self.__dict__["_fast_caches"] = {"kernel": {}, "scratch": {}, "batched": {}}
        return caches

    def _name(self, group: dict[str, Any]) -> str:
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        return group.get("name", str(index))

    def _refuse_non_finite(self, reference: list, batched: list) -> None:
        """Raise before anything changes if a checked gradient holds NaN/inf (the compiled
        kernel checks its own tensors, inside its first pass, before it changes any)."""
        rest = [(group, p) for _, group, params in reference for p in params]
        rest += batched
        rest = [(group, p) for group, p in rest if group.get("check_finite", True)]
        if rest:
            finite = finite_flags([p.grad for _, p in rest])
            if not bool(finite.all()):
                raise NonFiniteGradientError(self._name(rest[int(torch.nonzero(~finite)[0])][0]))

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SFW step for every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(False):  # one context (no_grad's decorator costs more)
            caches = self._caches()
            groups = self.param_groups
            # the routing of the last step, kept while every tensor went to the compiled
            # kernel and no group's switches changed; the kernel checks the tensors (STALE)
            route = caches.get("route")
            if route is not None and route == [_route(group) for group in groups]:
                items = [(group, p) for group in groups for p in group["params"]]
                refused = _cpu_kernel.kernel_step_(items, self.state, caches["kernel"],
                                                   caches["scratch"], strict=True)  # fmt: skip
                if refused is not _cpu_kernel.STALE:
                    if refused is not None:
                        raise NonFiniteGradientError(self._name(refused))
                    if self.diagnostics:
                        self.diagnostics = []
                    return loss
            self._step_dispatched(caches)
        return loss

    def _step_dispatched(self, caches: dict[str, dict]) -> None:
        """The step with :func:`dispatch` run first; keeps the routing for the next step when
        every parameter of every group went to the compiled kernel."""
        caches.pop("route", None)
        reference, kernel, batched = dispatch(self.param_groups)
        self._refuse_non_finite(reference, batched)
        if kernel:
            refused = _cpu_kernel.kernel_step_(kernel, self.state, caches["kernel"],
                                               caches["scratch"])  # fmt: skip
            if refused is not None:
                raise NonFiniteGradientError(self._name(refused))
        if batched:
            graphs = all(group.get("cuda_graph", True) for group, _ in batched)
            batched_step_(batched, self.state, caches["batched"], graphs)
        rows: list[dict[str, Any]] = []
        for index, group, params in reference:
            for row in reference_step_(params, group, self.state):
                if group.get("diagnostics", False):
                    rows.append({"name": group.get("name", str(index)), **row})
        self.diagnostics = rows
        if kernel and not reference and not batched:
            if len(kernel) == sum(len(group["params"]) for group in self.param_groups):
                caches["route"] = [_route(group) for group in self.param_groups]
