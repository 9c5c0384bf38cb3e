"""Calibration inputs for one-shot pruning: validation, chunking, layers as linear maps (§8).

A ``Linear`` maps rows ``x`` (its last dimension) to ``x Wᵀ + b``. A ``Conv2d`` is the same map
over unfolded patches: ``unfold(x)`` gives one row of ``C/groups·kh·kw`` features per output
position and group, and the conv is ``rows @ W_gᵀ + b_g`` per group ``g`` (``W_g`` the group's
filters flattened in ``(c, kh, kw)`` order, as ``weight.reshape(out, -1)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

LAYERS = (nn.Linear, nn.Conv2d)


def model_device(model: nn.Module) -> torch.device:
    for t in chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def calibration_chunks(
    calibration: Iterable[Any] | None, chunk: int, device: torch.device
) -> list[Tensor]:
    """The calibration inputs as a list of tensors of at most ``chunk`` samples on ``device``.

    ``calibration``: an iterable of input tensors or ``(inputs, targets, ...)`` pairs (labels are
    ignored). Raises ``ValueError`` (one line) if it is missing, empty, not tensors, of mixed
    per-sample shapes, or not finite.
    """
    if calibration is None:
        raise ValueError("Invalid calibration: None (expected batches of input tensors)")
    if isinstance(calibration, Tensor):
        calibration = [calibration]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk!r} (expected a positive int)")
    out: list[Tensor] = []
    shape = None
    for batch in calibration:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise ValueError(
                f"Invalid calibration batch: {type(x).__name__} "
                "(expected a floating tensor or an (inputs, ...) tuple)"
            )
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise ValueError(
                f"Invalid calibration batch shape: {tuple(x.shape)} (expected (N, *{tuple(shape)}))"
            )
        if not torch.isfinite(x).all():
            raise ValueError("Invalid calibration: inputs contain NaN or inf")
        out.extend(torch.split(x.detach().to(device), chunk))
    out = [x for x in out if len(x)]
    if not out:
        raise ValueError("Invalid calibration: empty (expected at least one input)")
    return out


def check_forward(model: nn.Module, x: Tensor) -> None:
    """Run ``model`` on two samples of ``x``; a failure (e.g. a wrong input shape) becomes a
    ValueError (two: a BatchNorm in training mode refuses one)."""
    try:
        with torch.no_grad():
            model(x[:2])
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"Invalid calibration input shape: {tuple(x.shape)} (the model fails on it: {first})"
        ) from None


def groups_of(module: nn.Module) -> int:
    return module.groups if isinstance(module, nn.Conv2d) else 1


def _padded(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, Any]:
    """``x`` with any non-zero or string padding applied, and the zero padding left to unfold."""
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return x, 0
    padding = module.padding
    if isinstance(padding, str):  # "same" / "valid": pad as Conv2d does
        if padding != "valid":
            x = F.pad(x, module._reversed_padding_repeated_twice)
        return x, 0
    return x, padding


def rows_per_sample(module: nn.Module, x: Tensor) -> int:
    """How many rows one sample of ``x`` gives (Linear: its middle dims; conv: output positions)."""
    if isinstance(module, nn.Linear):
        return x[:1].numel() // x.shape[-1]
    return len(_positions(module, x)[0]) * len(_positions(module, x)[1])


def _positions(module: nn.Conv2d, x: Tensor) -> tuple[range, range]:
    """Top-left input offsets of the output positions along height and width (padded input)."""
    xp, padding = _padded(module, x[:1])
    pad = (padding, padding) if isinstance(padding, int) else padding
    out = []
    for dim in range(2):
        size = xp.shape[2 + dim] + 2 * pad[dim]
        span = module.dilation[dim] * (module.kernel_size[dim] - 1) + 1
        out.append(range(0, size - span + 1, module.stride[dim]))
    return out[0], out[1]


def as_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as rows of features: ``(groups, rows, fan_in_per_group)``.

    Linear: ``x.reshape(-1, in_features)``. Conv2d: ``unfold`` of the (padded) input, one row per
    sample and output position.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    x, padding = _padded(module, x)
    cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    g = module.groups
    n, f, length = cols.shape  # f = C·kh·kw, channel-major: group blocks are contiguous
    return cols.view(n, g, f // g, length).permute(1, 0, 3, 2).reshape(g, n * length, f // g)


def sample_rows(module: nn.Module, x: Tensor, index: Tensor) -> Tensor:
    """``as_rows(module, x)[:, index]`` without unfolding the rows that are not taken.

    ``index``: flat row indices (``sample · rows_per_sample + position``), int64. A conv gathers
    each taken patch from the padded input directly: cost ``O(len(index) · fan_in)``.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[index].unsqueeze(0)
    hs, ws = _positions(module, x)
    xp, padding = _padded(module, x)
    pad = (padding, padding) if isinstance(padding, int) else padding
    if any(pad):
        xp = F.pad(xp, (pad[1], pad[1], pad[0], pad[0]))
    per = len(hs) * len(ws)
    s, pos = index // per, index % per
    top = hs.start + (pos // len(ws)) * hs.step
    left = ws.start + (pos % len(ws)) * ws.step
    kh = torch.arange(module.kernel_size[0], device=x.device) * module.dilation[0]
    kw = torch.arange(module.kernel_size[1], device=x.device) * module.dilation[1]
    c = torch.arange(x.shape[1], device=x.device)
    patches = xp[
        s.view(-1, 1, 1, 1),
        c.view(1, -1, 1, 1),
        (top.view(-1, 1) + kh).view(-1, 1, len(kh), 1),
        (left.view(-1, 1) + kw).view(-1, 1, 1, len(kw)),
    ]  # (k, C, kh, kw): the weight's (c, kh, kw) order
    g = module.groups
    return patches.reshape(len(index), g, -1).transpose(0, 1)


def out_rows(module: nn.Module, y: Tensor) -> Tensor:
    """A layer's output as ``(groups, rows, out_per_group)``, rows ordered as :func:`as_rows`."""
    if isinstance(module, nn.Linear):
        return y.reshape(1, -1, y.shape[-1])
    g = module.groups
    n, o = y.shape[:2]
    return y.reshape(n, g, o // g, -1).permute(1, 0, 3, 2).reshape(g, -1, o // g)


def sample_out_rows(module: nn.Module, y: Tensor, index: Tensor) -> Tensor:
    """``out_rows(module, y)[:, index]`` without reordering the rest of ``y``."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])[index].unsqueeze(0)
    n, o = y.shape[:2]
    per = y[0, 0].numel()
    taken = y.reshape(n, o, per)[index // per, :, index % per]  # (k, o)
    return taken.reshape(len(index), module.groups, -1).transpose(0, 1)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as ``(groups, out_per_group, fan_in_per_group)``, a view of the parameter."""
    g = groups_of(module)
    w = module.weight
    return w.view(g, w.shape[0] // g, -1)


class _Stop(Exception):
    """Raised in a hook to end a forward once the wanted layer has been seen."""


def module_calls(model: nn.Module, modules: Iterable[nn.Module], x: Tensor) -> list[nn.Module]:
    """Every call of one of ``modules`` when ``model`` runs on ``x`` (no grad), in call order."""
    calls: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, _args: calls.append(m)) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def forward_order(model: nn.Module, x: Tensor) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Linear/Conv2d layers in the order a forward on ``x`` calls them.

    A layer called more than once per forward (shared) is not supported: ValueError.
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, LAYERS)}
    calls = module_calls(model, names, x)
    seen = list(dict.fromkeys(calls))
    shared = [names[m] for m in seen if calls.count(m) > 1]
    if shared:
        raise ValueError(f"Invalid model: layers {shared} are called more than once per forward")
    return [(names[m], m) for m in seen]


def capture(
    model: nn.Module, module: nn.Module, x: Tensor, *, output: bool
) -> tuple[Tensor, Tensor | None]:
    """Input (and output if ``output``) of ``module`` when ``model`` runs on ``x``.

    The forward stops right after ``module``: later layers (and in-place ops) never run.
    """
    got: dict[str, Tensor] = {}

    def pre(m: nn.Module, args: Any) -> None:
        got["x"] = args[0].detach()
        if not output:
            raise _Stop

    def post(m: nn.Module, args: Any, out: Tensor) -> None:
        got["y"] = out.detach().clone()
        raise _Stop

    handles = [module.register_forward_pre_hook(pre)]
    if output:
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "x" not in got:
        raise ValueError("Invalid model: a layer was not called in the forward")
    return got["x"], got.get("y")


def feature_sq_sums(
    model: nn.Module, chunks: Iterable[Tensor]
) -> Iterator[tuple[nn.Module, Tensor, int]]:
    """Per Linear/Conv2d layer: ``Σ_rows x_j²`` per input feature ``j`` (float64) and the row count.

    Features are those of :func:`as_rows` (conv: input channel × kernel position), flattened over
    groups in the weight's ``(c, kh, kw)`` order, so the result reshapes like one filter.
    """
    sums: dict[nn.Module, list[Any]] = {}

    def hook(module: nn.Module, args: Any) -> None:
        rows = as_rows(module, args[0].detach())  # (g, rows, f)
        sq = rows.to(torch.float64).pow(2).sum(1)  # (g, f)
        entry = sums.setdefault(module, [0, 0])
        entry[0] = entry[0] + sq
        entry[1] += rows.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            for x in chunks:
                model(x)
    finally:
        for h in handles:
            h.remove()
    for module, (sq, count) in sums.items():
        yield module, sq, count


class LayerInputs:
    """Inputs of a model's layers, taken in forward order, without re-running the whole prefix.

    A probe forward (one sample) finds the *resume points*: submodules called once, with one
    positional tensor and no keyword, whose input is the very tensor their parent received or an
    earlier such sibling returned (a chain such as ``nn.Sequential`` stages and blocks, or a
    residual block's shortcut on the block's input), with the same values (a tensor changed in
    place keeps its id). The input of layer ``k`` is then got by running only its innermost
    resume-point ancestor from that ancestor's cached input, cut at ``k``; a resume point that
    returns its last child's very output (a ``Sequential``) is rebuilt from that child's input.
    Caches are kept per chunk while a later layer may need them and never go stale: every layer
    called before a resume point is final (reconstructed) when its input is first built.

    If the cached activations could exceed ``budget`` bytes (estimated from the probe), or no
    resume point exists, every input comes from a forward of the whole model cut at the layer.
    """

    def __init__(
        self, model: nn.Module, order: list[str], chunks: list[Tensor], budget: int
    ) -> None:
        self.model, self.chunks = model, chunks
        self.layers = [model.get_submodule(n) for n in order]
        self.source: dict[nn.Module, tuple[str, nn.Module]] = {}
        # a resume point -> its child whose output it returns (see _probe)
        self.tail: dict[nn.Module, nn.Module] = {}
        self.mutates: set[nn.Module] = set()
        self.anchor: list[nn.Module | None] = [None] * len(order)
        self.cache: dict[nn.Module, list[Tensor | None]] = {}
        self.last_use: dict[nn.Module, int] = {}
        self._probe(order, budget)

    def _probe(self, order: list[str], budget: int) -> None:
        model = self.model
        parent = {c: m for m in model.modules() for c in m.children()}
        calls: dict[nn.Module, int] = {}
        seq: list[nn.Module] = []
        ins: dict[nn.Module, tuple[int, bool, int]] = {}
        outs: dict[nn.Module, int] = {}
        alive: list[Any] = []  # every probed tensor stays alive, so ids are never reused

        # values as they were at the call (a tensor changed in place later keeps its id)
        in_val: dict[nn.Module, Tensor] = {}
        out_val: dict[nn.Module, Tensor] = {}
        live_in: dict[nn.Module, Tensor] = {}

        def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
            alive.append((args, kwargs))
            calls[m] = calls.get(m, 0) + 1
            seq.append(m)
            simple = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
            ins[m] = (id(args[0]) if simple else -1, simple, args[0].numel() if simple else 0)
            if simple:
                in_val[m] = args[0].detach().clone()
                live_in[m] = args[0]

        def post(m: nn.Module, args: tuple, out: Any) -> None:
            alive.append(out)
            outs[m] = id(out) if isinstance(out, Tensor) else -2
            if isinstance(out, Tensor):
                out_val[m] = out.detach().clone()

        x1 = self.chunks[0][:1]
        mods = [m for m in model.modules() if m is not model]
        handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
        handles += [m.register_forward_hook(post) for m in mods]
        try:
            with torch.no_grad():
                model(x1)
        finally:
            for h in handles:
                h.remove()
        root_in = id(x1)
        in_val[model] = x1
        # modules whose input was changed in place after their call (by them, e.g. an in-place
        # activation, or later): run on a copy of a cached input, which other layers may read
        self.mutates = {m for m, x in live_in.items() if not torch.equal(x, in_val[m])}

        def same(a: Tensor | None, b: Tensor | None) -> bool:
            return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)

        resume: dict[nn.Module, tuple[str, nn.Module]] = {}
        first_call = {m: i for i, m in reversed(list(enumerate(seq)))}
        for m in sorted(ins, key=first_call.__getitem__):
            p = parent.get(m)
            if calls[m] != 1 or not ins[m][1] or p is None:
                continue
            if p is not model and p not in resume:
                continue
            p_in = root_in if p is model else ins[p][0]
            if ins[m][0] == p_in and same(in_val[m], in_val.get(p)):
                resume[m] = ("parent", p)
                continue
            earlier = [s for s in p.children() if s in resume and first_call[s] < first_call[m]]
            hits = [s for s in earlier
                    if outs.get(s) == ins[m][0] and same(in_val[m], out_val.get(s))]  # fmt: skip
            if hits:
                resume[m] = ("sibling", hits[-1])
        self.source = resume
        # an nn.Sequential resume point returns its last child's very output: that child, run
        # from its own cached input, makes it (a subclass's forward may do more after it)
        for m in resume:
            kids = list(m.children())
            if type(m) is nn.Sequential and kids and kids[-1] in resume:
                if outs.get(kids[-1]) == outs[m] and same(out_val.get(kids[-1]), out_val.get(m)):
                    self.tail[m] = kids[-1]
        index = {layer: i for i, layer in enumerate(self.layers)}
        span: dict[nn.Module, tuple[int, int]] = {}
        for m in resume:
            inside = [index[x] for x in m.modules() if x in index]  # m itself if a layer
            if inside:
                span[m] = (min(inside), max(inside))
        for i, layer in enumerate(self.layers):
            m = parent.get(layer)
            chain = [layer] if layer in resume else []
            while m is not None and m is not model:
                chain.append(m)
                m = parent.get(m)
            anchors = [a for a in chain if a in resume]
            self.anchor[i] = anchors[0] if anchors else None
        # the last layer index at which each resume point's cached input may be needed: its own
        # layers, and building a later sibling's input from it (through layerless siblings)
        for m, (first, last) in span.items():
            self.last_use[m] = max(self.last_use.get(m, -1), last)
            s = m
            while True:
                kind, src = resume[s]
                if src is model:
                    break
                if kind == "sibling":
                    src = self._producer(src)
                self.last_use[src] = max(self.last_use.get(src, -1), first)
                if kind == "parent" or src in span:
                    break
                s = src
        n = sum(len(x) for x in self.chunks)
        peak = 0
        for i in range(len(self.layers)):
            live = [m for m, last in self.last_use.items() if last >= i and m in ins]
            peak = max(peak, sum(ins[m][2] for m in live))
        if peak * n * x1.element_size() > budget:
            self.anchor = [None] * len(self.layers)

    def _producer(self, m: nn.Module) -> nn.Module:
        """The module whose call makes ``m``'s output: ``m``, or its innermost tail child."""
        while m in self.tail:
            m = self.tail[m]
        return m

    def _input_of(self, m: nn.Module, c: int) -> Tensor:
        if m is self.model:
            return self.chunks[c]
        cached = self.cache.setdefault(m, [None] * len(self.chunks))
        if cached[c] is None:
            kind, src = self.source[m]
            if kind == "sibling":
                src = self._producer(src)
            x = self._input_of(src, c)
            if kind == "sibling":
                with torch.no_grad():
                    x = src(x.clone() if src in self.mutates else x)
            cached[c] = x
        x = cached[c]
        assert x is not None
        return x

    def fixed(self, i: int) -> bool:
        """Layer ``i``'s input depends on the calibration chunk alone: it is the chunk, or the
        output of a chain of modules without parameters or buffers (e.g. a ``Flatten``)."""
        m = self.anchor[i]
        if m is not self.layers[i]:
            return False
        while m is not self.model:
            kind, m = self.source[m]
            if kind == "sibling" and any(True for _ in (*m.parameters(), *m.buffers())):
                return False
        return True

    def get(self, i: int, c: int) -> Tensor:
        """Input of layer ``i`` (forward order) on chunk ``c``, with earlier layers as they are."""
        layer, anchor = self.layers[i], self.anchor[i]
        if anchor is None:
            return capture(self.model, layer, self.chunks[c], output=False)[0]
        x = self._input_of(anchor, c)
        if anchor is layer:
            return x
        return capture(anchor, layer, x.clone() if anchor in self.mutates else x, output=False)[0]

    def done(self, i: int) -> None:
        """Layer ``i`` is final: drop the cached inputs no later layer needs."""
        for m in [m for m in self.cache if self.last_use.get(m, -1) <= i]:
            del self.cache[m]
