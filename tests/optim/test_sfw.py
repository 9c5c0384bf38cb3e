"""The SFW optimizer: convergence, feasibility, state, schedulers, validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from sfwprune import SFW, KSparsePolytope, constraint_groups
from sfwprune.constraints import constraint_from_group


def _mlp(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(12, 32)]
    if bn:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def _data(seed: int = 0, n: int = 256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=gen)
    w = torch.randn(12, 4, generator=gen)
    return x, (x @ w).argmax(1)


def test_single_step_by_hand() -> None:
    # θ = (0.5, 0, 0, 0), g = (1, -2, 0.5, 0); K = 1, τ = 1: v = (0, 1, 0, 0).
    theta = nn.Parameter(torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64))
    group = {"params": [theta], **KSparsePolytope(n=4, k=1, radius=1.0).to_group()}
    opt = SFW([group], lr=0.1, momentum=0.9, rescale="gradient")
    theta.grad = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    opt.step()
    # m = g (first step); η = 0.1·||g||/||θ - v|| = 0.1·√5.25/√1.25
    eta = 0.1 * math.sqrt(5.25) / math.sqrt(1.25)
    expected = torch.tensor([0.5 * (1 - eta), eta, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(theta.detach(), expected)
    # second step: m = 0.9·m + 0.1·g'
    theta.grad = torch.tensor([0.0, 0.0, -30.0, 0.0], dtype=torch.float64)
    m = 0.9 * torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.1 * theta.grad
    assert torch.argmax(m.abs()) == 2
    v = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    prev = theta.detach().clone()
    opt.step()
    eta2 = min(1.0, 0.1 * float(m.norm()) / float((prev - v).norm()))
    assert torch.allclose(theta.detach(), prev + eta2 * (v - prev))
    assert torch.allclose(opt.state[theta]["momentum_buffer"], m)


def test_rescale_diameter_and_none() -> None:
    for rescale, eta in (("diameter", 0.5 / 2.0), (None, 0.5)):
        theta = nn.Parameter(torch.zeros(4, dtype=torch.float64))
        group = {"params": [theta], **KSparsePolytope(n=4, k=1, radius=1.0).to_group()}
        opt = SFW([group], lr=0.5, momentum=0.0, rescale=rescale)
        theta.grad = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
        opt.step()  # D = 2τ√K = 2
        assert torch.allclose(
            theta.detach(), torch.tensor([0.0, -eta, 0.0, 0.0], dtype=torch.float64)
        )


def test_unconstrained_params_take_averaged_gradient_step() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = SFW([w], lr=0.1, momentum=0.5)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.9, 0.8, 0.7]))
    w.grad = torch.tensor([3.0, 2.0, 1.0])
    opt.step()  # m = 0.5·(1,2,3) + 0.5·(3,2,1) = (2,2,2)
    assert torch.allclose(w.detach(), torch.tensor([0.7, 0.6, 0.5]))


def test_loss_decreases_and_fw_gap_shrinks_on_convex_problem() -> None:
    # Full-batch logistic regression inside an L1 ball, deterministic FW with η_t = 2/(t+2)
    # (rescale=None, momentum 0, LambdaLR): the classic rate; the FW gap must shrink.
    torch.manual_seed(0)
    x = torch.randn(200, 30, dtype=torch.float64)
    w_true = torch.zeros(30, dtype=torch.float64)
    w_true[:3] = torch.tensor([3.0, -2.0, 1.5])
    y = (x @ w_true > 0).to(torch.float64)
    w = nn.Parameter(torch.zeros(30, dtype=torch.float64))
    opt = SFW(
        [{"params": [w], "constraint": "l1", "radius": 5.0}],
        lr=1.0,
        momentum=0.0,
        rescale=None,
        diagnostics=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 2.0 / (t + 2.0))
    losses, gaps = [], []
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w, y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        gaps.append(float(opt.diagnostics[0]["fw_gap"]))
        assert w.detach().abs().sum() <= 5.0 + 1e-9
    assert losses[-1] < 0.5 * losses[0]
    assert all(g >= -1e-12 for g in gaps)
    assert min(gaps[-20:]) < 0.05 * gaps[0]
    assert sum(losses[-10:]) / 10 < sum(losses[10:20]) / 10


@pytest.mark.parametrize("kind", ["k_sparse", "k_support", "l1", "l2", "linf"])
def test_iterates_stay_inside_every_step(kind: str) -> None:
    model = _mlp()
    x, y = _data()
    groups = constraint_groups(model, kind, k_frac=0.1, value=5.0)
    opt = SFW(groups, lr=1.0, momentum=0.9)
    sets = [constraint_from_group(g, g["params"][0].numel()) for g in groups]
    first = None
    for step in range(40):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g, cset in zip(groups, sets):
            assert cset.contains(g["params"][0].detach(), atol=1e-5), (kind, step, g["name"])
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x), y))
    assert final < first


def test_tiny_lr_group_barely_moves_and_params_without_grad_skipped() -> None:
    model = _mlp(bn=False)
    x, y = _data()
    groups = constraint_groups(model)
    groups[0]["lr"] = 1e-9
    opt = SFW(groups, lr=1.0)
    unused = nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [unused], "constraint": "l2", "radius": 100.0})
    before = [p.detach().clone() for p in model.parameters()]
    unused_before = unused.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = list(model.parameters())
    assert torch.allclose(after[0], before[0], atol=1e-7)
    assert not torch.allclose(after[2], before[2], atol=1e-3)
    assert torch.equal(unused.detach(), unused_before)
    assert unused not in opt.state


def test_state_dict_round_trip_steps_in_lockstep(tmp_path) -> None:
    model = _mlp()
    x, y = _data()
    opt = SFW(constraint_groups(model), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    def train(m, o, s, steps, start):
        for t in range(start, start + steps):
            idx = torch.arange(t * 16, t * 16 + 16) % 256
            o.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            o.step()
            s.step()

    train(model, opt, sched, 4, 0)
    path = tmp_path / "opt.pt"
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)

    clone = copy.deepcopy(model)
    opt2 = SFW(constraint_groups(clone, mode="radius", value=1.0), lr=9.0)  # overwritten by load
    clone.load_state_dict(model.state_dict())  # constraint_groups moved clone into its sets
    opt2.load_state_dict(loaded["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    sched2.load_state_dict(loaded["sched"])
    assert [g["radius"] for g in opt2.param_groups] == [g["radius"] for g in opt.param_groups]
    train(model, opt, sched, 5, 4)
    train(clone, opt2, sched2, 5, 4)
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_is_plain_values() -> None:
    opt = SFW(constraint_groups(_mlp()), lr=1.0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["param_groups"][0]["constraint"] == "k_sparse"


def test_works_with_schedulers() -> None:
    opt = SFW(constraint_groups(_mlp()), lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_closure_and_diagnostics() -> None:
    model = _mlp(bn=False)
    x, y = _data()
    opt = SFW(constraint_groups(model), diagnostics=True)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    names = [d["name"] for d in opt.diagnostics]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for d in opt.diagnostics:
        assert float(d["fw_gap"]) >= 0
        assert 0 <= float(d["step_size"]) <= 1
    plain = SFW(model.parameters())
    plain.step(closure)
    assert plain.diagnostics == []


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"lr": -0.1}, "learning rate: -0.1"),
        ({"lr": float("nan")}, "learning rate: nan"),
        ({"momentum": 1.0}, "momentum: 1.0"),
        ({"momentum": -0.5}, "momentum: -0.5"),
        ({"rescale": "norm"}, "rescale: 'norm'"),
    ],
)
def test_bad_optimizer_arguments(kwargs, bad) -> None:
    with pytest.raises(ValueError, match="Invalid") as info:
        SFW(_mlp().parameters(), **kwargs)
    assert bad in str(info.value)


@pytest.mark.parametrize(
    "group, bad",
    [
        ({"constraint": "l3", "radius": 1.0}, "kind: 'l3'"),
        ({"constraint": "k_sparse", "k": 0, "radius": 1.0}, "k: 0"),
        ({"constraint": "k_sparse", "k": 99, "radius": 1.0}, "k: 99"),
        ({"constraint": "k_sparse", "k": 2, "radius": -1.0}, "radius: -1.0"),
        ({"constraint": "lp", "p": 0.5, "radius": 1.0}, "p: 0.5"),
        ({"constraint": "l2", "radius": 1.0, "n": 7}, "n: 7"),
        ({"constraint": "l2", "radius": 1.0, "lr": -2.0}, "learning rate: -2.0"),
    ],
)
def test_bad_groups(group, bad) -> None:
    w = nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match="Invalid") as info:
        SFW([{"params": [w], **group}])
    assert bad in str(info.value)


def test_weight_decay_key_is_refused() -> None:
    model = _mlp()
    groups = constraint_groups(model)
    groups[0]["weight_decay"] = 5e-4
    with pytest.raises(ValueError, match="Invalid weight_decay: 0.0005"):
        SFW(groups)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        SFW([{"params": list(model.parameters()), "weight_decay": 0.0}])


def test_unconstrained_groups_get_their_own_lr() -> None:
    model = _mlp(bn=False)
    x, y = _data()
    groups = constraint_groups(model, include="weights", unconstrained_lr=0.05)
    kinds = {g["name"]: g["constraint"] for g in groups}
    assert kinds == {"0.weight": "k_sparse", "0.bias": "unconstrained",
                     "2.weight": "k_sparse", "2.bias": "unconstrained"}  # fmt: skip
    opt = SFW(groups, lr=0.7, momentum=0.0)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"0.weight": 0.7, "0.bias": 0.05, "2.weight": 0.7, "2.bias": 0.05}
    bias = model[0].bias
    before = bias.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = bias.grad.clone()
    opt.step()  # momentum 0: m = g, θ ← θ - 0.05·g (not SFW's 0.7)
    torch.testing.assert_close(bias.detach(), before - 0.05 * grad)
    # the default matches torch SGD(lr=0.1, momentum=0.9): lr/(1-ρ) = 1.0
    assert {g["lr"] for g in constraint_groups(_mlp(), include="weights")
            if g["constraint"] == "unconstrained"} == {1.0}  # fmt: skip
    with pytest.raises(ValueError, match="Invalid unconstrained_lr: -1"):
        constraint_groups(_mlp(), unconstrained_lr=-1)
