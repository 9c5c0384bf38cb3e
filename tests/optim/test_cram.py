"""CrAM / CrAM+: one step against a hand computation, options and bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfwprune.constraints import constraint_from_group, constraint_groups
from sfwprune.optim import SFW
from sfwprune.optim.cram import CrAM


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, loss_fn=F.cross_entropy):
    """A closure for ``opt.step``: ``loss_fn(model(x), y)``, then its backward."""

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def _step(opt: CrAM, closure) -> torch.Tensor:
    """One step as a training loop takes it: the gradient at the dense weights, then CrAM."""
    opt.zero_grad()
    loss = closure()
    opt.step(closure)
    return loss


def _half_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum()


def _grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # L(w) = 0.5 ||x wᵀ - y||²  ->  ∇L = (x wᵀ - y)ᵀ x
    return (x @ w.T - y).T @ x


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("plus", [False, True])
def test_one_step_matches_hand_computation(plus, normalize, sparse_grad):
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    w0 = torch.tensor([[0.5, -0.2, 0.05, 1.0]], dtype=torch.float64)
    model.weight.data.copy_(w0)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    opt = CrAM(
        model.parameters(), lr=0.1, rho=0.05, sparsities=(0.5,), plus=plus, normalize=normalize,
        sparse_grad=sparse_grad,
    )  # fmt: skip
    _step(opt, _closure(model, x, y, _half_squared_error))

    g = _grad(w0, x, y)
    perturbed = w0 + 0.05 * (g / g.norm() if normalize else g)
    keep = torch.zeros_like(perturbed, dtype=torch.bool)
    keep[0, perturbed.abs()[0].argsort(descending=True)[:2]] = True  # top-2 of 4 = 50% sparsity
    g_c = _grad(perturbed * keep, x, y)
    if sparse_grad:  # the compressed point's gradient reaches only the entries it kept
        g_c = g_c * keep
    assert (g_c[~keep] == 0).all() == sparse_grad  # the case is not degenerate
    direction = g_c + g if plus else g_c
    torch.testing.assert_close(model.weight.data, w0 - 0.1 * direction)
    assert opt.last_sparsity == 0.5


def test_defaults_follow_the_official_code():
    # IST-DASLab/CrAM TopkCrAM as configured in its published runs: unnormalized ρ·g, the
    # compressed-point gradient masked to the kept entries, CrAM+.
    opt = CrAM(nn.Linear(3, 2).parameters(), lr=0.1)
    assert (opt.rho, opt.normalize, opt.sparse_grad, opt.plus) == (0.05, False, True, True)


def test_returns_loss_at_dense_weights_and_momentum_state_round_trips():
    torch.manual_seed(1)
    model = _mlp(6, 5, 3)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = CrAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    closure = _closure(model, x, y)

    with torch.no_grad():
        dense = F.cross_entropy(model(x), y)
    loss = _step(opt, closure)
    assert float(loss.detach()) == pytest.approx(float(dense))
    assert all(p.abs().sum() > 0 for p in model.parameters())  # dense weights restored
    state = opt.state_dict()
    other = CrAM(model.parameters(), lr=0.1, momentum=0.9)
    other.load_state_dict(state)
    assert set(other.state_dict()["state"]) == set(state["state"])


def test_loss_goes_down_and_scheduler_sees_the_groups():
    torch.manual_seed(2)
    model = _mlp(10, 16, 2)
    x = torch.randn(64, 10)
    y = (x[:, 0] > 0).long()
    opt = CrAM(model.parameters(), lr=0.2, momentum=0.9, sparsities=(0.5, 0.7))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    closure = _closure(model, x, y)

    first = float(_step(opt, closure).detach())
    for _ in range(30):
        _step(opt, closure)
        sched.step()
    assert float(_step(opt, closure).detach()) < 0.5 * first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**3)


def test_sfw_as_base_optimizer_stays_feasible():
    torch.manual_seed(3)
    model = _mlp(8, 8, 2)
    groups = constraint_groups(model)
    opt = CrAM(groups, SFW, lr=1.0, momentum=0.9, rho=0.05)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    closure = _closure(model, x, y)

    for _ in range(5):
        _step(opt, closure)
    for group in opt.param_groups:
        for p in group["params"]:
            assert constraint_from_group(group, p.numel()).contains(p.detach().reshape(-1))


def test_draws_are_seeded():
    model = nn.Linear(5, 5)
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        opt = CrAM(model.parameters(), lr=0.0, sparsities=(0.1, 0.5, 0.9), generator=gen)
        closure = _closure(model, torch.randn(4, 5), None, lambda out, _: out.sum())
        seq = []
        for _ in range(6):
            _step(opt, closure)
            seq.append(opt.last_sparsity)
        draws.append(seq)
    assert draws[0] == draws[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -1.0}, "Invalid rho"),
        ({"sparsities": (1.5,)}, "Invalid sparsities"),
        ({"sparsities": ()}, "Invalid sparsities"),
        ({"base_optimizer": object}, "Invalid base_optimizer"),
        ({"compress": [torch.zeros(2, 2, requires_grad=True)]}, "Invalid compress"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = nn.Linear(3, 3)
    kwargs = dict(kwargs)
    base = kwargs.pop("base_optimizer", torch.optim.SGD)
    with pytest.raises(ValueError, match=match):
        CrAM(model.parameters(), base, lr=0.1, **kwargs)


def test_step_without_closure_or_first_gradient_is_refused():
    model = nn.Linear(3, 3)
    opt = CrAM(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Invalid closure"):
        opt.step()
    with pytest.raises(ValueError, match="Invalid step: no gradients"):
        opt.step(lambda: model(torch.ones(1, 3)).sum().backward())
