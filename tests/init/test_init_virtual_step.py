"""The virtual SFW step: equal to SFW's real first step, and exactly differentiable (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfwprune import SFW, KSparsePolytope, constraint_groups
from sfwprune.constraints import constraint_from_group
from sfwprune.init import first_step_objective, step_size, virtual_sfw_step

DT = torch.float64


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(DT)


def _data(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(model[0], nn.Linear) else (n, 2, 4, 4)
    return torch.randn(shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kind", ["k_sparse", "k_support", "l1", "l2", "linf"])
@pytest.mark.parametrize("rescale", ["gradient", "diameter", None])
def test_virtual_step_equals_the_real_first_sfw_step(kind: str, rescale: str | None) -> None:
    torch.manual_seed(0)
    model = _mlp()
    # Weights carry the set, biases are unconstrained (both update rules are covered).
    groups = constraint_groups(model, kind, include="weights", value=2.0, unconstrained_lr=0.3)
    opt = SFW(groups, lr=0.3, rescale=rescale)
    x, y = _data(model, 16, seed=1)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {}
    for group in opt.param_groups:
        (p,) = group["params"]
        cset = constraint_from_group(group, p.numel())
        expected[group["name"]] = virtual_sfw_step(p.detach(), p.grad, cset, 0.3, rescale)
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-12)


def test_virtual_step_hand_case() -> None:
    cset = KSparsePolytope(n=3, k=1, radius=2.0)
    theta = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    grad = torch.tensor([0.0, 4.0, 0.0], dtype=DT)
    # v = (0, -2, 0); ||θ - v|| = √5; η = 0.1·4/√5.
    eta = 0.4 / 5**0.5
    out = virtual_sfw_step(theta, grad, cset, 0.1, "gradient")
    torch.testing.assert_close(out, torch.tensor([1.0 - eta, -2.0 * eta, 0.0], dtype=DT))


def test_step_size_is_zero_with_finite_gradient_at_zero_norms() -> None:
    cset = KSparsePolytope(n=3, k=1, radius=1.0)
    theta = torch.tensor([0.0, -1.0, 0.0], dtype=DT, requires_grad=True)
    grad = torch.zeros(3, dtype=DT, requires_grad=True)
    eta = step_size("gradient", 1.0, grad, cset.lmo(grad.detach()) - theta, cset)
    eta.backward()
    assert eta.item() == 0.0
    assert torch.isfinite(theta.grad).all() and torch.isfinite(grad.grad).all()
    # θ already at the vertex: direction 0.
    grad = torch.tensor([0.0, 5.0, 0.0], dtype=DT, requires_grad=True)
    theta.grad = None
    eta = step_size("gradient", 1.0, grad, cset.lmo(grad.detach()) - theta, cset)
    eta.backward()
    assert eta.item() == 0.0 and torch.isfinite(theta.grad).all()


def _objective_and_fd_grad(model, opt, grad_batch, eval_batch, base=None, eps=1e-6):
    """Autograd and central-difference derivatives of the objective wrt every scale."""
    names = [n for n, _ in model.named_parameters()]
    if base is None:
        base = torch.linspace(0.7, 1.3, len(names), dtype=DT).tolist()

    def f(values: list[float], requires_grad: bool = False) -> tuple[torch.Tensor, dict]:
        scales = {
            n: torch.tensor(v, dtype=DT, requires_grad=requires_grad)
            for n, v in zip(names, values, strict=True)
        }
        return first_step_objective(model, opt, scales, grad_batch, eval_batch), scales

    obj, scales = f(base, requires_grad=True)
    analytic = torch.stack(list(torch.autograd.grad(obj, list(scales.values()))))
    numeric = []
    for j in range(len(names)):
        plus, minus = list(base), list(base)
        plus[j] += eps
        minus[j] -= eps
        numeric.append((f(plus)[0] - f(minus)[0]).item() / (2 * eps))
    return analytic, torch.tensor(numeric, dtype=DT)


@pytest.mark.parametrize(
    ("builder", "kind", "rescale"),
    [
        (_mlp, "k_sparse", "gradient"),
        (_mlp, "k_sparse", "diameter"),
        (_mlp, "linf", None),
        (_mlp, "l1", "gradient"),
        (_conv_bn, "k_sparse", "gradient"),
    ],
)
def test_second_order_gradient_matches_finite_differences(builder, kind, rescale) -> None:
    # LMOs that are piecewise constant in g (K-sparse, L1, L∞): holding v constant is then
    # exact, so the autograd gradient (through g, second order) must equal the true derivative.
    torch.manual_seed(3)
    model = builder()
    groups = constraint_groups(model, kind, include="weights", value=1.0)
    opt = SFW(groups, lr=0.05, rescale=rescale)
    grad_batch, eval_batch = _data(model, 12, seed=4), _data(model, 12, seed=5)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    analytic, numeric = _objective_and_fd_grad(model, opt, grad_batch, eval_batch)
    assert analytic.abs().max() > 1e-3  # a gradient that is there to be checked
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n])


def test_the_second_order_term_matters() -> None:
    # Unconstrained tensors step θ - lr·g(θ): the derivative in α includes -lr·H θ⁰. Freezing g
    # (first order only) gives a different answer from the finite difference.
    torch.manual_seed(3)
    model = _mlp()
    opt = SFW(constraint_groups(model, "unconstrained"), lr=0.5)
    grad_batch, eval_batch = _data(model, 12, seed=4), _data(model, 12, seed=5)
    ones = [1.0] * len(list(model.parameters()))
    analytic, numeric = _objective_and_fd_grad(model, opt, grad_batch, eval_batch, base=ones)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)

    frozen = copy.deepcopy(model)
    x, y = grad_batch
    nn.functional.cross_entropy(frozen(x), y).backward()
    with torch.no_grad():
        for p in frozen.parameters():
            p.sub_(0.5 * p.grad)
    # With g frozen, θ' = α·θ⁰ - lr·g: the first-order derivative is <∇L_B(θ'), θ⁰>/lr.
    xb, yb = eval_batch
    loss = nn.functional.cross_entropy(frozen(xb), yb) / 0.5
    first_order = torch.autograd.grad(loss, list(frozen.parameters()))
    first = torch.stack(
        [torch.sum(g * p0) for g, p0 in zip(first_order, model.parameters(), strict=True)]
    )
    assert (first - numeric).abs().max() > 1e-2 * numeric.abs().max()


def test_unknown_scale_names_raise() -> None:
    model = _mlp()
    opt = SFW(constraint_groups(model, "k_sparse"), lr=0.1)
    batch = _data(model, 4, seed=0)
    with pytest.raises(ValueError, match="Invalid scales: \\['nope'\\]"):
        first_step_objective(model, opt, {"nope": torch.ones((), dtype=DT)}, batch, batch)
