"""The batched SFW step: every K-sparse tensor of one device and dtype in a fixed number of kernels.

Same math as :mod:`._reference` for the K-sparse polytope, on any device, with no host
synchronisation. On a GPU a per-tensor step (a ``topk``, gathers, scatters, norms) is bound by
kernel launches: ResNet-18's 62 tensors cost ~10 ms a step that way. Here:

- momentum for all tensors at once with ``torch._foreach_lerp_`` (one call per ρ);
- momentum and weights are concatenated into flat vectors ``M`` and ``Θ`` (one copy each);
- top-K: tensors of one size and K form a ``(G, n)`` view of ``|M|`` and share one ``topk``;
  tensors of at most :data:`PACK` entries are packed into one padded matrix and share one
  sorted ``topk``, each row keeping its first K (a precomputed, static index);
- the selected entries ``S`` of all tensors are one index vector, so the vertex
  ``v_S = -r·sign(m_S)``, the norms and the per-tensor ``η`` are a handful of kernels::

      ||θ - v||² = ||θ with θ_S := 0||² + ||θ_S - v_S||²
      θ ← (1-η) θ  off S;    θ_S ← θ_S + η (v_S - θ_S)  on S

Every shape is static, so on CUDA (``cuda_graph=True``) the step after the momentum update is
captured once as a CUDA graph and replayed: one launch instead of hundreds. Ties at the K-th
value may pick other coordinates than the reference (any choice minimizes the LMO).
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor
# Tensors of at most PACK entries share one padded top-K.
PACK = 16384
_CODES = {"gradient": 0, "diameter": 1, None: 2}


class BatchedPlan:
    """Static index work for K-sparse tensors of one device and dtype; valid while the tensors,
    their storage and their K and radius are unchanged. Holds them in its own order (packed
    small tensors first, then buckets of equal ``(n, K)``)."""

    def __init__(self, entries: list[tuple[dict[str, Any], Tensor, Tensor]], graphs: bool):
        small = [e for e in entries if e[1].numel() <= PACK]
        big: dict[tuple[int, int], list] = {}
        for e in entries:
            if e[1].numel() > PACK:
                big.setdefault((e[1].numel(), int(e[0]["k"])), []).append(e)
        ordered = small + [e for bucket in big.values() for e in bucket]
        self.groups = [e[0] for e in ordered]
        self.params = [e[1] for e in ordered]
        self.ms = [e[2] for e in ordered]
        p0 = self.params[0]
        device, long = p0.device, {"dtype": torch.long, "device": p0.device}
        self.sizes = sizes = [p.numel() for p in self.params]
        self.ks = ks = [int(g["k"]) for g in self.groups]
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        # the tensor each flat entry belongs to (int32: as much memory as a float32 copy)
        self.seg_n = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32, device=device), torch.tensor(sizes, **long)
        )
        # the tensor each selected entry belongs to (S is ordered tensor by tensor)
        self.seg_s = torch.repeat_interleave(torch.arange(len(sizes), **long),
                                             torch.tensor(ks, **long))  # fmt: skip
        radius = [-float(g["radius"]) for g in self.groups]
        self.neg_radius_s = torch.tensor(radius, dtype=p0.dtype, device=device)[self.seg_s]
        # packed: row r holds small tensor r's |m| in its first n_r columns, -1 after; a sorted
        # top-kmax per row, of which row r keeps its first k_r (static positions)
        self.n_small, self.n_small_total = len(small), sum(sizes[: len(small)])
        self.pack: tuple[Tensor, Tensor, Tensor, int, int] | None = None
        if small:
            width, kmax = max(sizes[: len(small)]), max(ks[: len(small)])
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
            self.buckets.append(
                (start, rows, n, k, torch.arange(rows, **long).view(rows, 1) * n + start)
            )
            pos += rows
        self.hyper_key: tuple | None = None
        self.hyper: tuple[Tensor, Tensor, Tensor] = ()  # type: ignore[assignment]
        self.graphs = graphs and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.calls = 0

    def _select(self, a: Tensor) -> Tensor:
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

    def _step(self) -> None:
        lr, l2_diameter, code = self.hyper
        big_m = torch.cat([m.reshape(-1) for m in self.ms])
        big_t = torch.cat([p.detach().reshape(-1) for p in self.params])
        idx = self._select(big_m.abs())
        m_s, th_s = big_m.index_select(0, idx), big_t.index_select(0, idx)
        d_s = torch.sign(m_s).mul_(self.neg_radius_s).sub_(th_s)  # v_S - θ_S
        big_t.index_fill_(0, idx, 0.0)
        off_norm = torch.stack(torch._foreach_norm(list(big_t.split(self.sizes))))
        d_norm = torch.stack(torch._foreach_norm(list(d_s.split(self.ks))))
        m_norm = torch.stack(torch._foreach_norm(list(big_m.split(self.sizes))))
        dist = torch.hypot(off_norm, d_norm)
        # η, the only place on this path: by the gradient, the diameter, or lr itself
        eta_g = torch.where(dist > 0, lr * m_norm / dist, torch.zeros_like(dist))
        eta = torch.where(code == 0, eta_g, torch.where(code == 1, lr / l2_diameter, lr))
        eta = torch.clamp(eta, 0.0, 1.0)
        big_t.mul_((1.0 - eta).index_select(0, self.seg_n))
        th_s.addcmul_(eta.index_select(0, self.seg_s), d_s)
        big_t.index_copy_(0, idx, th_s)
        chunks = big_t.split(self.sizes)
        torch._foreach_copy_(self.params, [c.view(p.shape) for c, p in zip(chunks, self.params)])

    def step(self) -> None:
        """One SFW step of every tensor, from the momentum already updated; in place."""
        values = tuple((float(g["lr"]), g["rescale"]) for g in self.groups)
        if values != self.hyper_key:  # a schedule changed lr: new values, same tensors
            p0 = self.params[0]
            lr = torch.tensor([v[0] for v in values], dtype=p0.dtype)
            diam = torch.tensor([2.0 * float(g["radius"]) * k**0.5 for g, k in zip(self.groups, self.ks)],
                                dtype=p0.dtype)  # fmt: skip
            code = torch.tensor([_CODES[v[1]] for v in values])
            new = (lr.to(p0.device), diam.to(p0.device), code.to(p0.device))
            if self.graph is not None:  # the graph reads these tensors: refill them
                torch._foreach_copy_(list(self.hyper), list(new))
            else:
                self.hyper = new
            self.hyper_key = values
        if not self.graphs:
            return self._step()
        self.calls += 1
        if self.graph is None and self.calls >= 2:
            self._capture()
        if self.graph is None:
            return self._step()
        with torch.cuda.device(self.params[0].device):
            self.graph.replay()

    def _capture(self) -> None:
        """Records :meth:`_step` as a CUDA graph; on failure, stays eager."""
        device = self.params[0].device
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(device):
                torch.cuda.current_stream(device).synchronize()
                stream = torch.cuda.Stream(device)
                # thread_local: other threads (a DataLoader's pin-memory thread) may use CUDA
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    self._step()
        except Exception as err:  # pragma: no cover - depends on the CUDA build
            self.graphs, self.graph_error = False, f"{type(err).__name__}: {err}"
            return
        self.graph = graph


@torch.no_grad()
def batched_step_(
    items: list[tuple[dict[str, Any], Tensor]],
    state: dict[Tensor, dict[str, Any]],
    cache: dict[tuple, BatchedPlan],
    graphs: bool,
) -> None:
    """One SFW step of each ``(group, p)`` of a K-sparse group, one batch per device and dtype.
    ``cache`` keeps the plans (rebuilt when tensors, storage, K or radius change)."""
    ms: list[Tensor] = []
    lerp: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for group, p in items:
        st = state[p]
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = st["momentum_buffer"] = p.grad.detach().clone(memory_format=torch.preserve_format)
        else:
            bucket = lerp.setdefault(float(group["momentum"]), ([], []))
            bucket[0].append(buf)
            bucket[1].append(p.grad)
        ms.append(buf)
    for rho, (bufs, grads) in lerp.items():
        # ρm + (1-ρ)g as m + (1-ρ)(g - m): one pass instead of two, equal up to rounding
        torch._foreach_lerp_(bufs, grads, 1.0 - rho)
    batches: dict[tuple, list] = {}
    for (group, p), m in zip(items, ms):
        batches.setdefault((p.device, p.dtype), []).append((group, p, m))
    for entries in batches.values():
        key = tuple((id(g), id(p), p.data_ptr(), m.data_ptr(), g["k"], g["radius"])
                    for g, p, m in entries)  # fmt: skip
        plan = cache.get(key)
        if plan is None:
            if len(cache) > 8:
                cache.clear()
            plan = cache[key] = BatchedPlan(entries, graphs)
        plan.step()
