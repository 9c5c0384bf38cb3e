"""Per-tensor constraint sets for a whole model, sized from its initialization (docs/algorithm.md §3).

``constraint_groups(model)`` returns optimizer param groups, one per parameter tensor, each
carrying its set as plain values (``constraint``, ``n``, ``k``, ``p``, ``radius``), so an
optimizer's ``state_dict()`` stays loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..params import is_weight
from .base import ConstraintSet, check_positive
from .group_k_sparse import GroupKSparsePolytope
from .k_sparse import KSparsePolytope
from .k_support import KSupportNormBall
from .lp_ball import LpBall
from .n_m import NMSparsePolytope, check_n_m
from .unconstrained import Unconstrained

KINDS = ("k_sparse", "l1", "l2", "linf", "lp", "k_support", "n_m", "channel", "unconstrained")
# Kinds whose groups of entries follow a weight's rows: they need ``group_size`` as well as ``k``.
STRUCTURED_KINDS = ("n_m", "channel")
MODES = ("initialization", "radius", "diameter")
_P_OF = {"l1": 1.0, "l2": 2.0, "linf": math.inf}

IncludeFn = Callable[[str, nn.Parameter], bool]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"Invalid constraint kind: {kind!r} (expected one of {', '.join(KINDS)})")
    return kind


def make_constraint(
    kind: str,
    n: int,
    *,
    k: int | None = None,
    p: float | None = None,
    radius: float | None = None,
    l2_diameter: float | None = None,
    group_size: int | None = None,
) -> ConstraintSet:
    """Build a set from plain values, e.g. ``make_constraint("k_sparse", 100, k=5, radius=0.1)``.

    ``kind`` is one of :data:`KINDS`; ``l1``/``l2``/``linf`` are L_p balls with that p;
    ``n_m`` (N = ``k``, M = ``group_size``) and ``channel`` (``k`` groups of ``group_size``
    entries) are the structured sets of :mod:`.n_m` and :mod:`.group_k_sparse`.
    """
    check_kind(kind)
    if kind == "unconstrained":
        return Unconstrained(n)
    if kind in STRUCTURED_KINDS:
        if k is None or group_size is None:
            raise ValueError(
                f"Invalid {kind} set: k={k!r}, group_size={group_size!r} (it needs both)"
            )
        cls = NMSparsePolytope if kind == "n_m" else GroupKSparsePolytope
        return cls(n, k, group_size, radius, l2_diameter=l2_diameter)
    if kind in ("k_sparse", "k_support"):
        if k is None:
            raise ValueError(f"Invalid k: None (the {kind} set needs k)")
        cls = KSparsePolytope if kind == "k_sparse" else KSupportNormBall
        return cls(n, k, radius, l2_diameter=l2_diameter)
    if kind == "lp" and p is None:
        raise ValueError("Invalid p: None (the lp set needs p)")
    return LpBall(n, _P_OF.get(kind, p), radius, l2_diameter=l2_diameter)  # type: ignore[arg-type]


def constraint_from_group(group: Mapping[str, Any], n: int) -> ConstraintSet:
    """The set described by an optimizer param group, for a tensor of ``n`` elements."""
    return make_constraint(
        group.get("constraint", "unconstrained"),
        n,
        k=group.get("k"),
        p=group.get("p"),
        radius=group.get("radius"),
        group_size=group.get("group_size"),
    )


def k_from_fraction(numel: int, k_frac: float, k_min: int) -> int:
    """``K = min(max(k_min, floor(k_frac · numel)), numel)``."""
    return min(max(k_min, math.floor(k_frac * numel)), numel)


def _owner_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (module that owns it directly, attribute name). Shared params once."""
    owners: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            owners[f"{mod_name}.{attr}" if mod_name else attr] = (module, attr)
    return owners


@torch.no_grad()
def expected_init_norms(
    model: nn.Module, samples: int = 8, fallback: float = 1.0
) -> dict[str, float]:
    """``E||θ_init||_2`` per parameter name, over fresh default initializations.

    Each owning module is deep-copied and re-initialized with its ``reset_parameters()``;
    the live model and the global RNG stream are left untouched. Parameters of modules without
    ``reset_parameters`` use their current norm. Norms of 0 (e.g. BatchNorm bias) become
    ``fallback``, since a set of diameter 0 could never move.
    """
    norms: dict[str, float] = {}
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0x5F3)
        for name, (module, attr) in _owner_modules(model).items():
            live = getattr(module, attr)
            value = 0.0
            if hasattr(module, "reset_parameters"):
                clone = copy.deepcopy(module)
                for _ in range(samples):
                    clone.reset_parameters()
                    value += float(torch.linalg.vector_norm(getattr(clone, attr).float()))
                value /= samples
            else:
                value = float(torch.linalg.vector_norm(live.float()))
            norms[name] = value if value > 0 else fallback
    return norms


def _include_fn(include: IncludeFn | str | None) -> IncludeFn:
    if include is None or include == "all":
        return lambda name, p: True
    if include == "weights":
        return is_weight  # the one meaning shared with prune_ (sfwprune.params)
    if callable(include):
        return include
    raise ValueError(
        f"Invalid include: {include!r} (expected None, 'all', 'weights' or a callable)"
    )


def constraint_groups(
    model: nn.Module,
    kind: str = "k_sparse",
    *,
    k_frac: float = 0.05,
    k_min: int = 10,
    radius_scale: float = 15.0,
    radius_from: str = "initialization",
    include: IncludeFn | str | None = None,
    p: float | None = None,
    n: int = 2,
    m: int = 4,
    unconstrained_lr: float = 1.0,
    value: float | None = None,
    mode: str | None = None,
) -> list[dict[str, Any]]:
    """One SFW param group per parameter tensor, each with its constraint set; moves params inside.

    Sizing (docs/algorithm.md §3): ``K = min(max(k_min, ⌊k_frac·numel⌋), numel)``; with
    ``radius_from="initialization"`` the set's L2 diameter is ``2·radius_scale·E||θ_init||``,
    with ``radius_from="radius"`` the radius is ``radius_scale``, with ``"diameter"`` the L2
    diameter is ``radius_scale``. Parameters are rescaled radially into their sets in place.

    Args:
        model: the network; parameters with ``requires_grad=False`` are left out.
        kind: ``k_sparse`` | ``l1`` | ``l2`` | ``linf`` | ``lp`` (with ``p``) | ``k_support`` |
            ``unconstrained``.
        k_frac, k_min: K for the K-sparse and K-support sets.
        radius_scale, radius_from: the set's size, see above (the paper's ``value`` and
            ``mode``; ``value=`` and ``mode=`` are still accepted as their old names).
        include: which tensors get ``kind``; the rest are unconstrained. ``None``/``"all"``,
            ``"weights"`` (tensors of dim >= 2, :mod:`sfwprune.params`: exactly what ``prune_``
            prunes by default), or ``fn(name, param) -> bool``.
        n, m: N and M of ``kind="n_m"``.
        unconstrained_lr: the ``lr`` of the unconstrained groups, which SFW steps by
            ``θ ← θ - lr·m`` (``m`` the exponential average of the gradients), independent of
            SFW's ``lr`` (a fraction of the way to a vertex). 1.0 (default) is the same step as
            ``torch.optim.SGD(lr=0.1, momentum=0.9)``: SGD's ``lr/(1-ρ)``.

    Structured kinds (docs/algorithm.md §7) apply to the weights of ``nn.Linear`` / conv layers, with
    their rows (``weight.reshape(out, -1)``) as the unit; every other included tensor (biases,
    BatchNorm parameters, and the weights the structured set does not fit) gets the K-sparse set,
    sized as above:

    - ``"n_m"``: the N:M polytope on each weight whose row length is a multiple of ``m``
      (groups of ``m`` consecutive entries of a row), ``τ`` from ``D = 2τ√(N·numel/M)``.
    - ``"channel"``: the group K-sparse polytope over output units on each weight except the
      model's output layer (the last Linear/conv in ``model.modules()`` order, whose units are
      the classes and never pruned); ``K = max(1, round(k_frac · out))`` groups, capped at
      ``out`` (``k_min`` is not applied: layers with 6 filters would otherwise be unconstrained
      in K), ``τ`` from ``D = 2τ√K``.

    Example:
        >>> groups = constraint_groups(model, "k_sparse", k_frac=0.05, radius_scale=15)
        >>> opt = SFW(groups, lr=1.0, momentum=0.9)
    """
    check_kind(kind)
    # the old names (the paper's code calls them value and mode); errors name what was passed
    scale_name, from_name = "radius_scale", "radius_from"
    if value is not None:
        radius_scale, scale_name = value, "value"
    if mode is not None:
        radius_from, from_name = mode, "mode"
    if radius_from not in MODES:
        raise ValueError(
            f"Invalid {from_name}: {radius_from!r} (expected one of {', '.join(MODES)})"
        )
    check_positive(scale_name, radius_scale)
    if not (isinstance(k_frac, (int, float)) and 0 < k_frac <= 1):
        raise ValueError(f"Invalid k_frac: {k_frac!r} (expected a number in (0, 1])")
    if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
        raise ValueError(f"Invalid k_min: {k_min!r} (expected an integer >= 1)")
    if kind == "n_m":
        check_n_m(n, m)
    if isinstance(unconstrained_lr, bool) or not (
        isinstance(unconstrained_lr, (int, float)) and unconstrained_lr >= 0
    ):
        raise ValueError(f"Invalid unconstrained_lr: {unconstrained_lr!r} (expected a number >= 0)")
    chosen = _include_fn(include)
    init_norms = expected_init_norms(model) if radius_from == "initialization" else {}
    layers = [mod for mod in model.modules() if isinstance(mod, (nn.Linear, _ConvNd))]
    output_layer = layers[-1] if layers else None

    groups: list[dict[str, Any]] = []
    for name, (module, attr) in _owner_modules(model).items():
        param = getattr(module, attr)
        if not param.requires_grad:
            continue
        numel = param.numel()
        this_kind = kind if chosen(name, param) else "unconstrained"
        k = group_size = None
        if this_kind in STRUCTURED_KINDS:
            this_kind, k, group_size = _structured_set(
                kind, module, attr, output_layer, numel, k_frac=k_frac, n=n, m=m
            )
        if this_kind in ("k_sparse", "k_support"):
            k = k_from_fraction(numel, k_frac, k_min)
        size: dict[str, float] = {}
        if this_kind != "unconstrained":
            if radius_from == "initialization":
                size["l2_diameter"] = 2.0 * radius_scale * init_norms[name]
            elif radius_from == "diameter":
                size["l2_diameter"] = radius_scale
            else:
                size["radius"] = radius_scale
        cset = make_constraint(this_kind, numel, k=k, p=p, group_size=group_size, **size)
        with torch.no_grad():
            param.copy_(cset.shift_inside(param))
        groups.append({"params": [param], "name": name, **cset.to_group()})
        if this_kind == "unconstrained":  # an SGD-like step: its own lr, not SFW's
            groups[-1]["lr"] = float(unconstrained_lr)
    return groups


def _structured_set(
    kind: str,
    module: nn.Module,
    attr: str,
    output_layer: nn.Module | None,
    numel: int,
    *,
    k_frac: float,
    n: int,
    m: int,
) -> tuple[str, int | None, int | None]:
    """``(kind, k, group_size)`` for one tensor under a structured kind; ``k_sparse`` where the
    structured set does not apply (see :func:`constraint_groups`)."""
    if attr != "weight" or not isinstance(module, (nn.Linear, _ConvNd)):
        return "k_sparse", None, None
    out = module.weight.shape[0]
    row = numel // out
    if kind == "n_m":
        return ("n_m", n, m) if row % m == 0 else ("k_sparse", None, None)
    if module is output_layer:
        return "k_sparse", None, None
    return "channel", min(out, max(1, round(k_frac * out))), row
