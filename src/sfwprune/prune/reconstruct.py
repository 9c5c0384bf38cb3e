"""Layer-wise reconstruction after pruning: re-solve kept weights to match dense outputs (§8).

For every Linear / Conv2d layer in forward order, with ``X`` its input in the pruned network
(earlier layers already reconstructed, a ones column for the bias), ``Y`` the dense layer's output
on the dense network's own input, and ``S_r`` the kept entries of output unit ``r``:

    w_r = argmin_{w: w_j = 0, j ∉ S_r}  ||Y_r − X w||² + λ||w||²,   λ = ridge · mean diag(XᵀX)

A conv is a Linear over unfolded patches, solved per group. Only ``H = XᵀX`` and ``B = XᵀY`` are
kept (float64, accumulated over calibration chunks and row blocks): memory ``O(fan_in²)`` per
layer. Exact per-unit solves or SparseGPT's OBS update (:mod:`.solvers`), chosen per layer by cost.
Conv outputs are matched before BatchNorm; BatchNorm statistics are re-estimated at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .bn import batchnorm_modules, recalibrate_bn
from .calibration import (
    LayerInputs,
    as_rows,
    calibration_chunks,
    capture,
    check_forward,
    forward_order,
    groups_of,
    model_device,
    module_calls,
    out_rows,
    rows_per_sample,
    sample_out_rows,
    sample_rows,
    weight_matrix,
)
from .solvers import SOLVERS, quadratic_error, solve

Tensor = torch.Tensor

# rows of one float32 block product added into the float64 H/B sums (see _Accumulator)
BLOCK_ROWS = 2048
# elements of one block of rows (32 MiB in float32): bounds the memory of H's accumulation
BLOCK_ELEMENTS = 2**23
# default cap on the rows (samples × output positions) of one layer used for H/B; see reconstruct_
MAX_ROWS = 2**15
# bytes of dense-layer targets kept for one level (else the dense net runs once per layer)
TARGET_CACHE_BYTES = 2**30
# re-solves per ReLU-fed layer with reconstruct_(relu_aware=True): chosen on the grid's selection
# seed (LeNet-5, seed 100: 2 beat 1 and 6 at 95-99% in a prototype; docs/algorithm.md §6)
RELU_STEPS = 2
# bytes of a ReLU-fed layer's row blocks kept for its re-solves (else one pass per re-solve)
RELU_ROWS_BYTES = 2**28
# bytes of the pruned network's activations cached at resume points (calibration.LayerInputs)
ACTIVATION_CACHE_BYTES = 2**31


def check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks as ``{parameter name: bool tensor}`` matching the model's parameters, else ValueError."""
    if not isinstance(masks, Mapping):
        raise ValueError(f"Invalid masks: {type(masks).__name__} (expected a dict name -> mask)")
    params = dict(model.named_parameters())
    out = {}
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"Invalid masks: {name!r} is not a parameter of the model")
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise ValueError(f"Invalid masks: {name!r} is not a bool tensor")
        if keep.shape != params[name].shape:
            raise ValueError(
                f"Invalid masks: {name!r} has shape {tuple(keep.shape)} "
                f"(expected {tuple(params[name].shape)})"
            )
        out[name] = keep.to(params[name].device)
    return out


def check_calibration(
    model: nn.Module, calibration: Iterable[Any] | None, chunk: int = 256
) -> list[Tensor]:
    """The calibration inputs as chunks on the model's device, checked by one forward (eval mode).

    Raises a one-line ValueError for missing, empty, non-finite or wrongly shaped inputs.
    """
    chunks = calibration_chunks(calibration, chunk, model_device(model))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        check_forward(model, chunks[0])
    finally:
        for m, training in flags:
            m.training = training
    return chunks


def _check_dense(model: nn.Module, dense: nn.Module) -> None:
    if not isinstance(dense, nn.Module):
        raise ValueError(f"Invalid dense: {type(dense).__name__} (expected an nn.Module)")
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    if shapes != [(n, p.shape) for n, p in dense.named_parameters()]:
        raise ValueError("Invalid dense: its parameters differ in names or shapes from the model's")


def _layer_keep(name: str, module: nn.Module, masks: Mapping[str, Tensor]) -> Tensor:
    """``(groups, out_per_group, d)`` keep mask, the bias (if any) as the last column."""
    w = weight_matrix(module)
    prefix = f"{name}." if name else ""
    keep = masks.get(f"{prefix}weight")
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device) if keep is None else keep
    keep = keep.reshape(w.shape)
    if module.bias is None:
        return keep
    kb = masks.get(f"{prefix}bias")
    kb = torch.ones(module.bias.shape, dtype=torch.bool, device=w.device) if kb is None else kb
    return torch.cat([keep, kb.reshape(w.shape[0], w.shape[1], 1)], dim=2)


class _Accumulator:
    """Float64 sums of ``XᵀX``, ``XᵀY``, the column sums of ``X`` and ``Y``, ``Σ Y²`` and the rows.

    Each block's products are computed in the block's dtype (at least float32; float64 with
    ``exact``) and added into float64 sums: a block has at most ``BLOCK_ROWS`` rows, so the
    float32 rounding of one product is ~1e-6 relative and does not compound across blocks.
    """

    def __init__(self, exact: bool, gram: bool = True) -> None:
        self.exact, self.gram = exact, gram
        self.sums: list[Tensor] | None = None

    def add(self, X: Tensor, Y: Tensor) -> None:
        dtype = torch.float64 if self.exact else torch.promote_types(X.dtype, torch.float32)
        X, Y = X.to(dtype), Y.to(dtype)
        Xt = X.transpose(1, 2)
        parts = [
            Xt @ X if self.gram else X.new_zeros(()),
            Xt @ Y,
            X.sum(1, dtype=torch.float64),
            Y.sum(1, dtype=torch.float64),
            Y.to(torch.float64).pow(2).sum(1),
        ]
        if self.sums is None:
            self.sums = [t.to(torch.float64) for t in parts] + [X.shape[1]]
        else:
            for total, t in zip(self.sums, parts, strict=False):
                total += t
            self.sums[5] += X.shape[1]

    def result(self, bias: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``H (g, d, d)``, ``B (g, d, out_g)``, ``yy (g, out_g)``; ``d`` has a bias row if asked
        (without ``gram``, ``H`` is a 0-d zero)."""
        assert self.sums is not None
        H, B, sx, sy, yy, rows = self.sums
        if bias:
            if self.gram:
                n = H.new_full((sx.shape[0], 1, 1), float(rows))
                H = torch.cat(
                    [torch.cat([H, sx.unsqueeze(2)], 2), torch.cat([sx.unsqueeze(1), n], 2)], 1
                )
            B = torch.cat([B, sy.unsqueeze(1)], 1)
        return H, B, yy


def _row_plan(
    dense: nn.Module, order: list[str], chunks: list[Tensor], max_rows: int | None, seed: int
) -> tuple[dict[str, list[Tensor | None]], dict[str, int]]:
    """Per layer and chunk: the flat row indices used for ``H``/``B`` (``None``: every row), and
    per layer the rows of one sample.

    A layer with more than ``max_rows`` rows (samples × output positions) over the calibration set
    uses ``max_rows`` of them, drawn uniformly without replacement (``torch.randperm`` seeded with
    ``seed`` + the layer's position in forward order): same rows in every call with that seed.
    """
    per: dict[str, int] = {}
    modules = {dense.get_submodule(n): n for n in order}

    def hook(module: nn.Module, args: Any) -> None:
        per[modules[module]] = rows_per_sample(module, args[0])

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            dense(chunks[0][:1])
    finally:
        for h in handles:
            h.remove()
    sizes = [len(x) for x in chunks]
    plan: dict[str, list[Tensor | None]] = {}
    for i, name in enumerate(order):
        total = sum(sizes) * per[name]
        if max_rows is None or total <= max_rows:
            plan[name] = [None] * len(chunks)
            continue
        gen = torch.Generator().manual_seed(seed + i)
        taken = torch.randperm(total, generator=gen)[:max_rows].sort().values
        starts = torch.tensor([0, *sizes]).cumsum(0) * per[name]
        cut = torch.searchsorted(taken, starts).tolist()
        device = chunks[0].device
        plan[name] = [
            (taken[cut[c] : cut[c + 1]] - starts[c]).to(device) for c in range(len(chunks))
        ]
    return plan, per


def _targets_of(module: nn.Module, y: Tensor, index: Tensor | None) -> Tensor:
    return out_rows(module, y).clone() if index is None else sample_out_rows(module, y, index)


def _dense_targets(
    dense: nn.Module,
    order: list[str],
    chunks: list[Tensor],
    plan: dict[str, list[Tensor | None]],
    per: dict[str, int],
) -> dict[str, list[Tensor]] | None:
    """Every layer's dense output rows per chunk from one dense forward per chunk.

    ``None`` if they would take more than ``TARGET_CACHE_BYTES`` (then each layer runs the dense
    network up to itself per chunk instead).
    """
    size = 0
    for name in order:
        m = dense.get_submodule(name)
        for x, index in zip(chunks, plan[name], strict=True):
            rows = len(x) * per[name] if index is None else len(index)
            size += rows * m.weight.shape[0] * m.weight.element_size()
    if size > TARGET_CACHE_BYTES:
        return None
    modules = {dense.get_submodule(n): n for n in order}
    targets: dict[str, list[Tensor]] = {n: [] for n in order}
    current: list[int] = [0]

    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        name = modules[module]
        targets[name].append(_targets_of(module, out.detach(), plan[name][current[0]]))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            for c, x in enumerate(chunks):
                current[0] = c
                dense(x)
    finally:
        for h in handles:
            h.remove()
    return targets


def _sums(t: Tensor) -> tuple:
    """Shape, float64 sum and position-weighted sum of ``t`` (a reordering changes the last)."""
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return tuple(t.shape), float(flat.sum()), float(flat @ weights)


def _fingerprint(dense: nn.Module, chunks: list[Tensor]) -> tuple:
    """:func:`_sums` of the dense network's state and of the inputs (cache key)."""
    state = [(k, *_sums(v)) for k, v in dense.state_dict().items()]
    return tuple(state), tuple(_sums(x) for x in chunks)


def _statistics(
    inputs: LayerInputs,
    i: int,
    dense: nn.Module,
    name: str,
    chunks: list[Tensor],
    plan: list[Tensor | None],
    targets: list[Tensor] | None,
    exact: bool,
    relu_step: Tensor | None = None,
    rows: list[tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``H (g, d, d)``, ``B (g, d, out_g)``, ``yy (g, out_g)`` for layer ``name``, in float64.

    Rows come from the pruned network's input of the layer and, as targets, the dense layer's
    output (``targets`` per chunk if precomputed); only the rows in ``plan`` when it has indices.
    ``relu_step``: the layer's current weights ``(g, out_g, d)`` (bias last): then only ``B`` is
    computed (``H`` is returned as a 0-d zero), for the targets of :func:`_relu_targets`.
    ``rows``: a list that receives every block ``(X, Y)`` too, while they take at most
    ``RELU_ROWS_BYTES`` (it is emptied and set aside when they would take more).
    """
    mp, md = inputs.layers[i], dense.get_submodule(name)
    acc = _Accumulator(exact, gram=relu_step is None)
    held = 0  # bytes of the blocks in rows
    for c, x in enumerate(chunks):
        index = plan[c]
        if index is not None and len(index) == 0:
            continue
        xp = inputs.get(i, c)
        if targets is not None:
            Y = targets[c]
        else:
            _, y = capture(dense, md, x, output=True)
            Y = _targets_of(mp, y, index)
        f = weight_matrix(mp).shape[2]
        block = max(1, min(BLOCK_ROWS, BLOCK_ELEMENTS // f))
        if index is None:
            per = rows_per_sample(mp, xp)
            step = max(1, block // per)
            blocks = ((a * per, as_rows(mp, xp[a : a + step])) for a in range(0, len(xp), step))
        else:
            blocks = (
                (a, sample_rows(mp, xp, index[a : a + block])) for a in range(0, len(index), block)
            )
        for a, X in blocks:
            Yb = Y[:, a : a + X.shape[1]]
            acc.add(X, _relu_targets(X, Yb, relu_step))
            if rows is not None:
                rows.append((X, Yb))
                held += X.numel() * X.element_size() + Yb.numel() * Yb.element_size()
                if held > RELU_ROWS_BYTES:
                    rows.clear()
                    rows = None
    return acc.result(mp.bias is not None)


def _relu_statistic(
    rows: list[tuple[Tensor, Tensor]], W: Tensor, exact: bool, bias: bool
) -> Tensor:
    """``B`` of the stored row blocks with the targets of :func:`_relu_targets` for ``W``."""
    acc = _Accumulator(exact, gram=False)
    for X, Y in rows:
        acc.add(X, _relu_targets(X, Y, W))
    return acc.result(bias)[1]


def _relu_targets(X: Tensor, Y: Tensor, W: Tensor | None) -> Tensor:
    """The targets of one ReLU-aware re-solve (``Y`` itself when ``W`` is None).

    With ``p = x·w`` the current prediction of a row, ``(y − p)²`` is replaced by a quadratic
    that bounds the ReLU's error ``(relu(y) − relu(p))²`` from above and touches it at ``p``
    (majorize-minimize): target ``y`` where ``y > 0``, else ``min(p, 0)``. A row whose dense
    output the ReLU cuts to 0 then only asks the prediction to stay ``<= 0``.
    """
    if W is None:
        return Y
    f = X.shape[2]
    W = W.to(X.dtype)  # the prediction only enters targets: the precision of the targets
    P = (
        torch.baddbmm(W[:, :, f:].transpose(1, 2), X, W[:, :, :f].transpose(1, 2))
        if W.shape[2] > f
        else X @ W.transpose(1, 2)
    )
    return torch.where(Y > 0, Y, P.clamp(max=0).to(Y.dtype))


def _augmented(module: nn.Module) -> Tensor:
    """The weights as ``(groups, out_per_group, fan_in_per_group [+ 1 for the bias])``, float64."""
    w = weight_matrix(module).detach().to(torch.float64)
    if module.bias is None:
        return w
    return torch.cat([w, module.bias.detach().to(torch.float64).view(*w.shape[:2], 1)], 2)


def _relative_error(module: nn.Module, stats: tuple[Tensor, Tensor, Tensor]) -> float:
    """``||Y_dense − X w||² / ||Y_dense||²`` of the layer's current weights (see the statistics)."""
    H, B, yy = stats
    W = _augmented(module)
    error = sum(quadratic_error(H[g], B[g], yy[g], W[g]) for g in range(len(W)))
    total = float(yy.sum())
    return error / total if total > 0 else error


@torch.no_grad()
def _reconstruct_layer(
    model: nn.Module,
    name: str,
    masks: Mapping[str, Tensor],
    stats: tuple[Tensor, Tensor, Tensor],
    ridge: float,
    solver: str,
    memos: list[dict] | None,
) -> str:
    """Re-solve the layer's kept weights (and bias) in place; the solver(s) used."""
    module = model.get_submodule(name)
    H, B, _ = stats
    keep = _layer_keep(name, module, masks)
    w = weight_matrix(module)  # (g, out_g, f), a view of the parameter
    used = set()
    for g in range(groups_of(module)):
        W, how = solve(H[g], B[g], keep[g], ridge, solver, None if memos is None else memos[g])
        used.add(how)
        w[g].copy_(W[:, : w.shape[2]])
        if module.bias is not None:
            module.bias.view(w.shape[0], -1)[g].copy_(W[:, -1])
    return "+".join(sorted(used))


def check_relu_aware(relu_aware: Any, reconstruct: bool) -> None:
    """``relu_aware`` is a bool, and True only with ``reconstruct``."""
    if not isinstance(relu_aware, bool):
        raise ValueError(f"Invalid relu_aware: {relu_aware!r} (expected True or False)")
    if relu_aware and not reconstruct:
        raise ValueError("Invalid relu_aware: True (needs reconstruct=True)")


def relu_fed(model: nn.Module, order: Iterable[str], x: Tensor) -> set[str]:
    """The layers of ``order`` whose output goes straight into an ``nn.ReLU`` and nowhere else:
    the next child of the same plain ``nn.Sequential`` (a subclass may use it otherwise), which
    a forward on ``x`` calls as a whole (a forward that calls its children one by one may read
    the layer's output elsewhere)."""
    parents: dict[nn.Module, list[str]] = {}
    for parent_name, parent in model.named_modules():
        if type(parent) is not nn.Sequential:
            continue
        children = list(parent.named_children())
        for (child, _), (_, after) in zip(children, children[1:], strict=False):
            name = f"{parent_name}.{child}" if parent_name else child
            if type(after) is nn.ReLU and name in order:
                parents.setdefault(parent, []).append(name)
    return {name for p in set(module_calls(model, parents, x)) for name in parents[p]}


def reconstruct_(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    calibration: Iterable[Any],
    *,
    dense: nn.Module | None = None,
    ridge: float = 1e-3,
    solver: str = "auto",
    chunk: int = 256,
    recalibrate: bool = True,
    max_rows: int | None = MAX_ROWS,
    seed: int = 0,
    exact_statistics: bool = False,
    cache: dict[str, Any] | None = None,
    errors: bool = True,
    relu_aware: bool = False,
) -> dict[str, dict[str, Any]]:
    """Apply ``masks`` and re-solve every Linear/Conv2d layer's kept weights and bias in place.

    Layers are taken in the order a forward calls them; each is fitted to the dense network's
    output of that layer from the pruned network's own input (see the module docstring).

    Args:
        model: the network; its masked weights are zeroed and the kept ones (and biases) re-solved.
        masks: ``{parameter name: bool keep mask}``, e.g. what :func:`prune_` returns; a layer
            without a mask is re-solved with every entry kept. Conv1d/3d/transposed convs are
            masked only.
        calibration: an iterable of input tensors or ``(inputs, targets)`` pairs (labels unused).
        dense: a network of the same architecture with the dense weights; default ``None`` takes
            ``model`` itself, as it is before the masks are applied, as the dense network.
        ridge: ``λ = ridge · mean diag(XᵀX)`` per layer/group; must be > 0.
        solver: ``"exact"`` (per-unit solves), ``"obs"`` (SparseGPT's update) or ``"auto"`` (the
            cheaper in flops per layer; exact below ``solvers.EXACT_LIMIT`` flops).
        chunk: samples per forward pass.
        recalibrate: re-estimate BatchNorm statistics on the calibration inputs at the end.
        max_rows: per layer, at most this many rows (sample × output position: a conv has one per
            output pixel) enter ``H``/``B``, drawn uniformly without replacement with ``seed``;
            ``None``: all rows. Only convs with large maps reach the default (2**15): e.g. 2048
            32x32 images give ResNet-18's first stage 2M rows; its last stage (16 positions)
            keeps all 32768. The cost of ``H`` is ``rows · fan_in²`` per layer.
        seed: the seed of the row sampling (layer ``i`` in forward order uses ``seed + i``).
        exact_statistics: form every product of ``H``/``B`` in float64 (reference; slower). By
            default blocks of at most ``BLOCK_ROWS`` rows are multiplied in float32 (or the
            model's wider dtype) and summed in float64.
        cache: a dict kept across calls with the same ``dense`` network, calibration inputs,
            ``max_rows``, ``seed`` and ``exact_statistics`` (e.g. the levels of a sweep): the
            rows drawn, the dense layers' target rows, and the statistics of a layer whose input
            depends on the calibration inputs alone (only modules without parameters or buffers
            before it) are computed once and reused (with the solvers' factorizations of them
            and, for a ReLU-fed layer with ``relu_aware``, its row blocks). A
            fingerprint (shapes, sums and position-weighted sums of the dense state and of the
            inputs) is checked, and the entry replaced when it differs.
        errors: measure each layer's output error before and after (two quadratic forms in
            ``H`` per layer; a sweep, which does not report them, passes False).
        relu_aware: for a layer whose output goes straight into a ReLU (:func:`relu_fed`), match
            what the ReLU passes on rather than the output itself: after the least-squares solve,
            ``RELU_STEPS`` re-solves with the targets of :func:`_relu_targets` (a pre-activation
            the dense ReLU cuts to 0 need only stay ``<= 0``). Costs one pass over the layer's
            rows per step (``B`` only).

    Returns:
        ``{layer name: {"solver", "error_before", "error_after"}}`` in forward order: the layer's
        output error ``||Y_dense − X w||² / ||Y_dense||²`` on the calibration set (its rows used
        for ``H``) with the masked weights and with the re-solved ones (only ``"solver"`` with
        ``errors=False``). For a layer re-solved ``relu_aware`` it stays the error of the raw
        output, which those re-solves trade for the error after the ReLU: it may grow.

    Raises:
        ValueError: bad arguments, or empty / NaN / wrongly shaped calibration inputs; the model is
        unchanged then.

    Example:
        >>> masks = prune_(copy.deepcopy(net), 0.9)
        >>> info = reconstruct_(net, masks, [x_train[:2048]])
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"Invalid ridge: {ridge!r} (expected a number > 0)")
    if solver not in SOLVERS:
        raise ValueError(f"Invalid solver: {solver!r} (expected one of {', '.join(SOLVERS)})")
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
    ):
        raise ValueError(f"Invalid max_rows: {max_rows!r} (expected a positive int or None)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (expected an int)")
    if not isinstance(errors, bool):
        raise ValueError(f"Invalid errors: {errors!r} (expected True or False)")
    check_relu_aware(relu_aware, True)
    if cache is not None and not isinstance(cache, dict):
        raise ValueError(f"Invalid cache: {type(cache).__name__} (expected a dict or None)")
    masks = check_masks(model, masks)
    if dense is not None:
        _check_dense(model, dense)
    chunks = calibration_chunks(calibration, chunk, model_device(model))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        check_forward(model, chunks[0])
        if dense is None:
            dense = copy.deepcopy(model)
        dense_flags = [(m, m.training) for m in dense.modules()]
        dense.eval()
        order = [name for name, _ in forward_order(dense, chunks[0])]
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ok = False
        try:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, keep in masks.items():
                    params[name].masked_fill_(~keep, 0)
            key = (max_rows, seed, exact_statistics, _fingerprint(dense, chunks))
            if cache is not None and cache.get("key") == key:
                plan, targets, kept = cache["plan"], cache["targets"], cache["stats"]
            else:
                plan, per = _row_plan(dense, order, chunks, max_rows, seed)
                targets, kept = _dense_targets(dense, order, chunks, plan, per), {}
                if cache is not None:
                    cache.clear()
                    cache.update(key=key, plan=plan, targets=targets, stats=kept)
            inputs = LayerInputs(model, order, chunks, ACTIVATION_CACHE_BYTES)
            relu = relu_fed(model, order, chunks[0][:1]) if relu_aware else set()
            info: dict[str, dict[str, Any]] = {}
            for i, name in enumerate(order):
                # a layer whose input depends on the calibration inputs alone has the same
                # statistics (and rows) in every call with this key (a sweep's first layer): kept
                fixed = inputs.fixed(i)
                layer_targets = None if targets is None else targets[name]
                rows: list[tuple[Tensor, Tensor]] | None = [] if name in relu else None
                if fixed and name in kept:
                    stats, memos, rows = kept[name]
                else:
                    stats = _statistics(
                        inputs, i, dense, name, chunks, plan[name], layer_targets,
                        exact_statistics, rows=rows,
                    )  # fmt: skip
                    memos = None  # the solver's factorizations of H, per group
                    if fixed or name in relu:  # reused: over calls / by the re-solves below
                        memos = [{} for _ in range(stats[0].shape[0])]
                    if fixed:
                        kept[name] = (stats, memos, rows)
                layer = inputs.layers[i]
                before = _relative_error(layer, stats) if errors else None
                how = _reconstruct_layer(model, name, masks, stats, float(ridge), solver, memos)
                for _ in range(RELU_STEPS if name in relu else 0):
                    if rows:  # the layer's row blocks, kept
                        bias = layer.bias is not None
                        B = _relu_statistic(rows, _augmented(layer), exact_statistics, bias)
                    else:  # too many to keep: a pass over the calibration set per step
                        _, B, _ = _statistics(
                            inputs, i, dense, name, chunks, plan[name], layer_targets,
                            exact_statistics, relu_step=_augmented(layer),
                        )  # fmt: skip
                    _reconstruct_layer(
                        model, name, masks, (stats[0], B, stats[2]), float(ridge), solver, memos
                    )
                info[name] = {"solver": how}
                if errors:
                    info[name].update(
                        error_before=before, error_after=_relative_error(layer, stats)
                    )
                inputs.done(i)
            if recalibrate and batchnorm_modules(model):
                recalibrate_bn(model, chunks)
            ok = True
        finally:
            if not ok:
                model.load_state_dict(saved)
            for m, training in dense_flags:
                m.training = training
    finally:
        for m, training in flags:
            m.training = training
    return info
