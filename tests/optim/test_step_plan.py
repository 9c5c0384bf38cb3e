"""The compiled kernel keeps its rows between steps (``_cpu_kernel.StepPlan``): every change
that a step must see is seen, so the kernel path stays equal to the reference loop."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from sfwprune import SFW, make_constraint
from sfwprune.optim import _cpu_kernel
from sfwprune.optim._cpu_kernel import SMALL
from sfwprune.optim.finite import NonFiniteGradientError

pytestmark = pytest.mark.skipif(not _cpu_kernel.AVAILABLE, reason="numba missing")

# (numel, k, radius): two band tensors (> SMALL) and two small ones
SHAPES = [(SMALL + 3000, 900, 0.05), (SMALL + 500, 40, 0.3), (600, 30, 0.5), (12, 12, 1.0)]


def _params(dtype: torch.dtype = torch.float64) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for j, (n, k, radius) in enumerate(SHAPES):
        cset = make_constraint("k_sparse", n, k=k, radius=radius)
        p = torch.nn.Parameter(cset.shift_inside(torch.randn(n, generator=gen, dtype=dtype)))
        groups.append({"params": [p], "name": f"t{j}", **cset.to_group()})
    return groups


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + 0.1 * step) for p in params]


def _lockstep(steps: int, between: Callable[[int, SFW, list], None], **kwargs) -> None:
    """The kernel path and the reference loop, given the same gradients and the same change
    ``between(step, opt, params)`` before each step; weights and momenta must agree."""
    runs = []
    for foreach in (None, False):
        groups = copy.deepcopy(_params())
        opt = SFW(groups, lr=0.5, momentum=0.8, foreach=foreach, **kwargs)
        runs.append((opt, [g["params"][0] for g in groups]))
    for step in range(steps):
        grads = _grads(step, runs[0][1])
        for opt, params in runs:
            between(step, opt, params)
            for p, g in zip(params, grads):  # between() may mark a tensor to get no grad
                p.grad = None if getattr(p, "_skip", False) else g.clone().reshape(p.shape)
            opt.step()
        (fast, fast_params), (ref, ref_params) = runs
        for pf, pr in zip(fast_params, ref_params):
            torch.testing.assert_close(pf, pr, rtol=1e-10, atol=1e-12)
            mf = fast.state[pf].get("momentum_buffer")
            mr = ref.state[pr].get("momentum_buffer")
            assert (mf is None) == (mr is None)
            if mf is not None:
                torch.testing.assert_close(mf, mr, rtol=1e-10, atol=1e-12)


def test_kernel_path_is_taken() -> None:
    groups = _params()
    params = [g["params"][0] for g in groups]
    opt = SFW(groups)
    for p, g in zip(params, _grads(0, params)):
        p.grad = g
    opt.step()
    plan = opt._caches()["kernel"]["plan"]
    assert plan.params == params
    for p, g in zip(params, _grads(1, params)):
        p.grad = g
    opt.step()
    assert opt._caches()["kernel"]["plan"] is not plan  # the momenta are new: rebuilt once
    plan = opt._caches()["kernel"]["plan"]
    for p, g in zip(params, _grads(2, params)):
        p.grad = g
    opt.step()
    assert opt._caches()["kernel"]["plan"] is plan  # then kept


def test_scheduler_lr_and_momentum_changes_every_step() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        for j, group in enumerate(opt.param_groups):
            group["lr"] = 0.5 / (1 + step + j)
            group["momentum"] = 0.9 if step % 2 else 0.5

    _lockstep(6, between)


def test_torch_scheduler_changes_lr() -> None:
    runs = []
    for foreach in (None, False):
        groups = copy.deepcopy(_params())
        opt = SFW(groups, lr=0.5, foreach=foreach)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        runs.append((opt, sched, [g["params"][0] for g in groups]))
    for step in range(5):
        grads = _grads(step, runs[0][2])
        for opt, sched, params in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            sched.step()
    for pf, pr in zip(runs[0][2], runs[1][2]):
        torch.testing.assert_close(pf, pr, rtol=1e-10, atol=1e-12)


def test_set_k_radius_rescale_changes_between_steps() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        if step == 3:
            opt.param_groups[0]["k"] = 2000
            opt.param_groups[1]["radius"] = 0.2
            opt.param_groups[2]["rescale"] = None
        if step == 5:
            opt.param_groups[0]["k"] = 6000  # 4K > n: the band gives way to the partition
            opt.param_groups[3]["rescale"] = "diameter"

    _lockstep(8, between)


def test_a_gradient_that_becomes_none_is_skipped_then_resumes() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        params[1]._skip = step in (2, 3)
        params[3]._skip = step == 4

    _lockstep(7, between)


def _stepped(steps: int) -> tuple[SFW, list[torch.Tensor]]:
    """A default SFW on the test tensors after ``steps`` steps (the kernel path)."""
    groups = _params()
    params = [g["params"][0] for g in groups]
    opt = SFW(groups)
    for step in range(steps):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
    return opt, params


def test_skipped_tensor_keeps_weights_and_momentum() -> None:
    opt, params = _stepped(3)
    before = params[0].detach().clone(), opt.state[params[0]]["momentum_buffer"].clone()
    params[0].grad = None
    for p, g in zip(params[1:], _grads(3, params[1:])):
        p.grad = g
    opt.step()
    assert torch.equal(params[0], before[0])
    assert torch.equal(opt.state[params[0]]["momentum_buffer"], before[1])


def test_add_param_group_after_steps() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        if step == 3:  # the last tensor joins the optimizer now (it had no group before)
            opt.add_param_group(held[id(opt)])
            params.append(held[id(opt)]["params"][0])

    held: dict[int, dict] = {}
    runs = []
    for foreach in (None, False):
        groups = copy.deepcopy(_params())
        opt = SFW(groups[:-1], lr=0.5, foreach=foreach)
        held[id(opt)] = groups[-1]
        runs.append((opt, [g["params"][0] for g in groups[:-1]]))
    for step in range(6):
        for opt, params in runs:
            between(step, opt, params)
        grads = _grads(step, runs[0][1])
        for opt, params in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for pf, pr in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(pf, pr, rtol=1e-10, atol=1e-12)


def test_load_state_dict_replaces_the_momentum() -> None:
    saved = {}

    def between(step: int, opt: SFW, params: list) -> None:
        if step == 2:
            saved[id(opt)] = copy.deepcopy(opt.state_dict())
        if step == 5:  # back to the momenta after step 1
            opt.load_state_dict(saved[id(opt)])

    _lockstep(8, between)


def test_new_memory_dtype_and_zeroed_grads() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        if step == 2:  # new storage for one weight
            params[0].data = params[0].data.clone()
        if step == 4:  # momentum buffer replaced by the user
            buf = opt.state[params[2]]["momentum_buffer"]
            opt.state[params[2]]["momentum_buffer"] = buf.clone()

    _lockstep(7, between)


def test_grad_kept_between_steps_zero_grad_set_to_none_false() -> None:
    runs = []
    for foreach in (None, False):
        groups = copy.deepcopy(_params())
        runs.append((SFW(groups, foreach=foreach), [g["params"][0] for g in groups]))
    for step in range(5):
        grads = _grads(step, runs[0][1])
        for opt, params in runs:
            opt.zero_grad(set_to_none=False)
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g)
            opt.step()
    for pf, pr in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(pf, pr, rtol=1e-10, atol=1e-12)


def test_refused_step_after_cached_steps_changes_nothing() -> None:
    runs = []
    for foreach in (None, False):
        groups = _params()
        runs.append((SFW(groups, foreach=foreach), [g["params"][0] for g in groups]))
    for step in range(6):
        grads = _grads(step, runs[0][1])
        if step == 3:
            grads[2][5] = float("nan")
        for opt, params in runs:
            before = [(p.detach().clone(), opt.state[p].get("momentum_buffer")) for p in params]
            before = [(w, None if m is None else m.clone()) for w, m in before]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if step != 3:
                opt.step()
                continue
            with pytest.raises(NonFiniteGradientError, match="t2"):
                opt.step()
            for p, (w, m) in zip(params, before):
                assert torch.equal(p, w)
                assert torch.equal(opt.state[p]["momentum_buffer"], m)
    for pf, pr in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(pf, pr, rtol=1e-10, atol=1e-12)


def test_first_step_refused_then_taken() -> None:
    groups = _params()
    params = [g["params"][0] for g in groups]
    opt = SFW(groups)
    grads = _grads(0, params)
    grads[0][0] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert all("momentum_buffer" not in opt.state[p] for p in params)
    grads[0][0] = 0.0
    ref_groups = _params()
    ref = SFW(ref_groups, foreach=False)
    ref_params = [g["params"][0] for g in ref_groups]
    for p, q, g in zip(params, ref_params, grads):
        p.grad, q.grad = g, g.clone()
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# SFW.step keeps the last step's routing (caches["route"]) while every tensor went to the
# kernel: each change below must still reach dispatch() or a rebuilt plan.


def test_route_is_kept_in_steady_state_and_dropped_on_a_switch() -> None:
    opt, params = _stepped(3)
    route, plan = opt._caches()["route"], opt._caches()["kernel"]["plan"]
    for p, g in zip(params, _grads(3, params)):
        p.grad = g
    opt.step()
    assert opt._caches()["route"] is route and opt._caches()["kernel"]["plan"] is plan
    opt.param_groups[1]["diagnostics"] = True
    for p, g in zip(params, _grads(4, params)):
        p.grad = g
    opt.step()
    assert [row["name"] for row in opt.diagnostics] == ["t1"]  # the reference loop ran
    assert "route" not in opt._caches()
    opt.param_groups[1]["diagnostics"] = False
    for step in (5, 6):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
    assert opt.diagnostics == [] and "route" in opt._caches()


def test_switches_changed_after_steps() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        groups = opt.param_groups
        if step == 3:
            groups[1]["foreach"] = False
        if step == 4:
            groups[1]["foreach"] = None
            groups[2]["diagnostics"] = True
        if step == 5:
            groups[2]["diagnostics"] = False
            groups[0]["fused"] = False  # the batched torch step
        if step == 6:
            groups[0]["fused"] = None
            groups[3]["constraint"] = "unconstrained"

    _lockstep(9, between)


def test_param_replaced_in_its_group_list() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        if step == 3:
            q = torch.nn.Parameter(params[2].detach().clone())
            opt.param_groups[2]["params"][0] = q
            params[2] = q

    _lockstep(7, between)


def test_weights_become_a_non_contiguous_view_of_the_same_memory() -> None:
    def between(step: int, opt: SFW, params: list) -> None:
        if step == 3:  # same data_ptr and numel, transposed: the batched step takes it
            params[2].data = params[2].data.view(20, 30).t()
            buf = opt.state[params[2]]["momentum_buffer"]  # the same object, viewed alike
            buf.set_(buf.untyped_storage(), 0, (30, 20), (1, 30))

    _lockstep(7, between)


def test_strict_kernel_step_reports_stale_and_changes_nothing() -> None:
    groups = SFW(_params()).param_groups  # with the defaults filled in
    params = [g["params"][0] for g in groups]
    items = [(g, g["params"][0]) for g in groups]
    state: dict = {p: {} for p in params}
    cache: dict = {}
    for p, g in zip(params, _grads(0, params)):
        p.grad = g
    assert _cpu_kernel.kernel_step_(items, state, cache, {}, strict=True) is _cpu_kernel.STALE
    assert "plan" not in cache and all(not s for s in state.values())  # nothing built or set
    assert _cpu_kernel.kernel_step_(items, state, cache, {}) is None
    before = [p.detach().clone() for p in params]
    params[1].grad = None
    assert _cpu_kernel.kernel_step_(items, state, cache, {}, strict=True) is _cpu_kernel.STALE
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="Invalid items"):
        _cpu_kernel.kernel_step_(items, state, cache, {})
