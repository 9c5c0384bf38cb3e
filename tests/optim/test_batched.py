"""The batched K-sparse step (optim._batched) against the per-tensor reference step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune import SFW, make_constraint
from sfwprune.optim._batched import PACK, BatchedPlan

# (shape, k): repeated shapes share a top-K; small ones are packed; k = n and k = 1 included
SHAPES = [((64,), 3), ((64,), 3), ((10,), 10), ((3, 3, 3, 4), 5), ((130, 140), 900),
          ((130, 140), 900), ((130, 140), 50), ((PACK + 7,), PACK + 7), ((200,), 1),
          ((170, 130), 1000)]  # fmt: skip


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params(dtype: torch.dtype, device: str = "cpu") -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter((torch.randn(*s, generator=gen, dtype=dtype) * 0.01).to(device))
            for s, _ in SHAPES]  # fmt: skip


def _train(dtype: torch.dtype, foreach: bool, device: str, steps: int = 6) -> list[torch.Tensor]:
    params = _params(dtype, device)
    groups = [
        {"params": [p], **make_constraint("k_sparse", p.numel(), k=k, radius=0.5 + i / 10).to_group(),
         "lr": 0.9 if i % 3 else 0.4, "rescale": "gradient" if i % 4 else "diameter"}
        for i, (p, (_, k)) in enumerate(zip(params, SHAPES))
    ]  # fmt: skip
    opt = SFW(groups, momentum=0.8, foreach=foreach, fused=None if foreach is False else False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
        opt.step()
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_flat_step_matches_reference(dtype: torch.dtype, tol: float, device: str) -> None:
    for got, want in zip(_train(dtype, True, device), _train(dtype, False, device)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-2)


def test_plan_groups_tensors_and_steps_each_by_its_own_eta() -> None:
    params = _params(torch.float64)
    gen = torch.Generator().manual_seed(2)
    ms = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    t = len(params)
    rescales = ["gradient", "diameter", None]
    groups = [{"k": k, "radius": 1.0, "lr": 0.1 + 0.9 * i / t, "rescale": rescales[i % 3]}
              for i, (_, k) in enumerate(SHAPES)]  # fmt: skip
    plan = BatchedPlan(list(zip(groups, params, ms)), graphs=False)
    # packed: every tensor of at most PACK entries; buckets: the (n, k) pairs above PACK
    assert plan.n_small == sum(p.numel() <= PACK for p in params)
    assert sorted((rows, n, k) for _, rows, n, k, _ in plan.buckets) == sorted(
        [
            (1, 130 * 140, 50),
            (1, 170 * 130, 1000),
            (1, PACK + 7, PACK + 7),
            (2, 130 * 140, 900),
        ]
    )
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        plan.step()
    for i, (p, m, (_, k)) in enumerate(zip(params, ms, SHAPES)):
        flat = m.view(-1)
        idx = torch.topk(flat.abs(), k).indices
        v = torch.zeros_like(flat)
        v[idx] = -torch.sign(flat[idx])
        d = v - before[i].view(-1)
        lr = groups[i]["lr"]
        want = {"gradient": lr * float(flat.norm() / d.norm()), "diameter": lr / (2 * k**0.5),
                None: lr}[groups[i]["rescale"]]  # fmt: skip
        want = min(max(want, 0.0), 1.0)
        torch.testing.assert_close(p.detach().view(-1), before[i].view(-1) + want * d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graph", [True, False])
def test_cuda_graph_replays_the_same_steps(graph: bool) -> None:
    params = _params(torch.float32, "cuda")
    groups = [{"params": [p], **make_constraint("k_sparse", p.numel(), k=k, radius=0.5).to_group()}
              for p, (_, k) in zip(params, SHAPES)]  # fmt: skip
    opt = SFW(groups, lr=0.9, momentum=0.8, cuda_graph=graph, check_finite=False)
    ref = [p.detach().clone().requires_grad_() for p in params]
    ref_opt = SFW([{**g, "params": [r]} for g, r in zip(groups, ref)], lr=0.9, momentum=0.8,
                  foreach=False)  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(6):
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=gen, device="cuda")
            r.grad = p.grad.clone()
        # a schedule: the replayed graph must read each step's learning rate
        for g in opt.param_groups + ref_opt.param_groups:
            g["lr"] = 0.9 / (1 + step)
        opt.step()
        ref_opt.step()
    (plan,) = opt._caches()["batched"].values()
    assert (plan.graph is not None) == graph, plan.graph_error
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-6)
