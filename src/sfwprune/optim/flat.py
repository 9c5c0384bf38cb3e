"""The K-sparse SFW step for many tensors at once, in a fixed number of device kernels.

On a GPU the per-tensor step (a ``topk``, a few gathers and scatters, norms) is bound by kernel
launches, not arithmetic: ResNet-18's 62 tensors cost ~10 ms a step that way. Here every
tensor of one device and dtype is stepped together, with no host synchronisation:

- momentum and weights are concatenated into flat vectors ``M`` and ``Θ`` (one copy each);
- top-K: tensors of one size and K form a ``(G, n)`` view of ``|M|`` and share one ``topk``;
  tensors of at most :data:`PACK` entries are packed into one padded matrix and share one
  sorted ``topk``, each row keeping its first K (a precomputed, static index);
- the selected entries ``S`` of all tensors are one index vector (its length is fixed by the
  K's), so gathers, the vertex ``v_S = -r·sign(m_S)``, the norms (``torch._foreach_norm`` over
  split views) and the per-tensor ``η`` are a handful of kernels whatever the tensor count:

      ||θ - v||² = ||θ with θ_S := 0||² + ||θ_S - v_S||²
      θ ← (1-η) θ  off S;    θ_S ← θ_S + η (v_S - θ_S)  on S

- ``Θ`` is copied back into the parameters with one ``torch._foreach_copy_``.

Every shape is static, so on CUDA the whole step is captured once as a CUDA graph and replayed
(the momentum update, the learning rates and the finiteness check stay outside it): the step
then costs the GPU's work, not hundreds of kernel launches from Python.

Same results as :mod:`.reference` up to rounding; ties at the K-th value may pick other
coordinates than a per-tensor ``topk`` (any choice minimizes the LMO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
# Tensors of at most PACK entries share one padded top-K.
PACK = 16384


@dataclass
class FlatEntry:
    """One tensor of the batch: 1-d views of its weights and momentum, its K and radius."""

    theta: Tensor
    m: Tensor
    k: int
    radius: float


class FlatSignPlan:
    """Static index work for a batch of K-sparse tensors on one device and dtype.

    Built once per set of tensors (the optimizer's plan cache keeps it); :meth:`step` then
    needs no host synchronisation, and its kernel count grows with the number of distinct
    tensor shapes (one ``topk`` each), not with the number of tensors.
    """

    def __init__(self, entries: list[FlatEntry], graphs: bool = True) -> None:
        device, dtype = entries[0].theta.device, entries[0].theta.dtype
        self.graphs = graphs  # capture the step in a CUDA graph (CUDA only)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_io: tuple[Tensor, ...] = ()
        self.graph_error: str | None = None
        self.calls = 0
        long = {"dtype": torch.long, "device": device}
        # order: packed (small) tensors first, then buckets of equal (n, K)
        small = [j for j, e in enumerate(entries) if e.theta.numel() <= PACK]
        big: dict[tuple[int, int], list[int]] = {}
        for j, e in enumerate(entries):
            if e.theta.numel() > PACK:
                big.setdefault((e.theta.numel(), e.k), []).append(j)
        order = small + [j for bucket in big.values() for j in bucket]
        self.order = order
        self.perm: Tensor | None = None
        self.inverse: Tensor | None = None
        if order != sorted(order):
            self.perm = torch.tensor(order, **long)
            self.inverse = torch.empty_like(self.perm)
            self.inverse[self.perm] = torch.arange(len(order), **long)
        sizes = [entries[j].theta.numel() for j in order]
        ks = [entries[j].k for j in order]
        self.sizes, self.ks = sizes, ks
        self.n_total = sum(sizes)
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        # the tensor each flat entry belongs to (int32: as much memory as a float32 copy)
        self.seg_n = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32, device=device),
            torch.tensor(sizes, **long),
        )
        # the tensor each selected entry belongs to (S is ordered tensor by tensor)
        self.seg_s = torch.repeat_interleave(torch.arange(len(sizes), **long),
                                             torch.tensor(ks, **long))  # fmt: skip
        radius = torch.tensor([entries[j].radius for j in order], dtype=dtype, device=device)
        self.neg_radius_s = -radius.index_select(0, self.seg_s)
        # packed: row r holds small tensor r's |m| in its first n_r columns, -1 after; a sorted
        # top-kmax per row, of which row r keeps its first k_r (static positions)
        self.n_small = len(small)
        self.n_small_total = sum(sizes[: len(small)])
        self.pack: tuple[Tensor, Tensor, Tensor, int, int] | None = None
        if small:
            width = max(sizes[: len(small)])
            kmax = max(ks[: len(small)])
            dst = torch.cat([torch.arange(n, **long) + r * width
                             for r, n in enumerate(sizes[: len(small)])])  # fmt: skip
            keep = torch.cat([torch.arange(k, **long) + r * kmax
                              for r, k in enumerate(ks[: len(small)])])  # fmt: skip
            # flat position of (row r, column c) is starts[r] + c
            base = torch.tensor(starts[: len(small)], **long).index_select(0, keep // kmax)
            self.pack = (dst, keep, base, width, kmax)
        # buckets: (start in the flat vector, rows, n, k, per-row start)
        self.buckets: list[tuple[int, int, int, int, Tensor]] = []
        pos = len(small)
        for (n, k), members in big.items():
            start, rows = starts[pos], len(members)
            base = (torch.arange(rows, **long) * n + start).view(rows, 1)
            self.buckets.append((start, rows, n, k, base))
            pos += rows

    def select(self, a: Tensor) -> Tensor:
        """Flat indices (into ``a``, the concatenated ``|m|``) of every tensor's top-K."""
        parts = []
        if self.pack is not None:
            dst, keep, base, width, kmax = self.pack
            padded = torch.full((self.n_small * width,), -1.0, dtype=a.dtype, device=a.device)
            padded.index_copy_(0, dst, a[: self.n_small_total])
            top = torch.topk(padded.view(self.n_small, width), kmax, dim=1, sorted=True).indices
            parts.append(top.reshape(-1).index_select(0, keep) + base)
        for start, rows, n, k, base in self.buckets:
            block = a[start : start + rows * n].view(rows, n)
            if k < n:
                idx = torch.topk(block, k, dim=1, sorted=False).indices
            else:
                idx = torch.arange(n, device=a.device).expand(rows, n)
            parts.append((idx + base).reshape(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def step(self, entries: list[FlatEntry], lr: Tensor, fixed: Tensor, use_grad: Tensor) -> Tensor:
        """One SFW step of every entry, in place; returns the per-tensor ``η`` (device vector).

        ``lr``, ``fixed`` (η when not rescaled by the gradient) and ``use_grad`` are per-tensor
        device vectors; all in ``entries`` order. On CUDA (with ``graphs``) the second and later
        calls replay a CUDA graph of the whole step: one launch instead of hundreds.
        """
        if not (self.graphs and lr.is_cuda):
            return self._step(entries, lr, fixed, use_grad)
        if self.graph is None and self.calls >= 1:
            self._capture(entries, lr, fixed, use_grad)
        self.calls += 1
        if self.graph is None:
            return self._step(entries, lr, fixed, use_grad)
        static_lr, static_fixed, static_use, eta = self.graph_io
        with torch.cuda.device(lr.device):  # the graph's device, whichever is current
            static_lr.copy_(lr)
            static_fixed.copy_(fixed)
            static_use.copy_(use_grad)
            self.graph.replay()
        return eta

    def _capture(self, entries: list[FlatEntry], lr: Tensor, fixed: Tensor, use_grad: Tensor):
        """Records :meth:`_step` as a CUDA graph (nothing runs); on failure, stays eager."""
        io = (lr.clone(), fixed.clone(), use_grad.clone())
        graph = torch.cuda.CUDAGraph()
        device = lr.device
        try:
            with torch.cuda.device(device):  # capture on the tensors' device, not the current
                torch.cuda.current_stream(device).synchronize()
                stream = torch.cuda.Stream(device)
                # thread_local: other threads (e.g. a DataLoader's pin-memory thread) may keep
                # calling CUDA while this one captures
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    eta = self._step(entries, *io)
        except Exception as err:  # pragma: no cover - depends on the CUDA build
            self.graphs = False
            self.graph_error = f"{type(err).__name__}: {err}"
            return
        self.graph, self.graph_io = graph, (*io, eta)

    def _step(
        self, entries: list[FlatEntry], lr: Tensor, fixed: Tensor, use_grad: Tensor
    ) -> Tensor:
        ordered = [entries[j] for j in self.order]
        thetas = [e.theta for e in ordered]
        ms = [e.m for e in ordered]
        if self.perm is not None:
            lr, fixed, use_grad = lr[self.perm], fixed[self.perm], use_grad[self.perm]
        big_m = torch.cat(ms)
        big_t = torch.cat(thetas)
        idx = self.select(big_m.abs())
        m_s = big_m.index_select(0, idx)
        th_s = big_t.index_select(0, idx)
        d_s = torch.sign(m_s).mul_(self.neg_radius_s).sub_(th_s)  # v_S - θ_S
        big_t.index_fill_(0, idx, 0.0)
        off_norm = torch.stack(torch._foreach_norm(list(big_t.split(self.sizes))))
        d_norm = torch.stack(torch._foreach_norm(list(d_s.split(self.ks))))
        m_norm = torch.stack(torch._foreach_norm(ms))
        dist = torch.hypot(off_norm, d_norm)
        eta_g = torch.where(dist > 0, lr * m_norm / dist, torch.zeros_like(dist))
        eta = torch.where(use_grad, torch.clamp(eta_g, 0.0, 1.0), fixed)
        big_t.mul_((1.0 - eta).index_select(0, self.seg_n))
        th_s.addcmul_(eta.index_select(0, self.seg_s), d_s)
        big_t.index_copy_(0, idx, th_s)
        torch._foreach_copy_(thetas, list(big_t.split(self.sizes)))
        return eta if self.inverse is None else eta[self.inverse]
