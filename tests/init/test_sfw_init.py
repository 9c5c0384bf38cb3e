"""SFW-Init end to end on tiny models: objective, feasibility, directions, floors, BN, inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfwprune import SFW, constraint_groups
from sfwprune.constraints import constraint_from_group
from sfwprune.init import SFWInitResult, sfw_init


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def _batches(model: nn.Module, n: int = 256, size: int = 64, seed: int = 0) -> list:
    """A linearly separable 3-class problem, as a list of batches."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 10) if isinstance(model[0], nn.Linear) else (n, 2, 6, 6)
    x = torch.randn(shape, generator=g)
    y = (x.flatten(1)[:, :10] @ torch.randn(10, 3, generator=g)).argmax(1)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _setup(builder=_mlp, value: float = 15.0, seed: int = 0):
    torch.manual_seed(seed)
    model = builder()
    opt = SFW(constraint_groups(model, "k_sparse", value=value), lr=1.0, momentum=0.9)
    return model, opt, _batches(model, seed=seed)


def _sets(opt: SFW) -> dict:
    return {g["name"]: constraint_from_group(g, g["params"][0].numel()) for g in opt.param_groups}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("builder", [_mlp, _conv_bn])
def test_objective_goes_down(builder) -> None:
    model, opt, batches = _setup(builder)
    result = sfw_init(model, opt, batches, iters=40, lr=0.1)
    assert isinstance(result, SFWInitResult)
    assert result.iters == 40 and len(result.objective) == 40 and result.seconds > 0
    # 4 batches cycled 10 times: the first and last 4 iterations see the same batch pairs.
    first, last = sum(result.objective[:4]) / 4, sum(result.objective[-4:]) / 4
    assert last < 0.95 * first, (first, last)
    assert set(result.scales) == {n for n, _ in model.named_parameters()}
    assert any(abs(a - 1.0) > 0.05 for a in result.scales.values())


def test_feasible_and_directions_unchanged_with_tight_sets() -> None:
    # Sets as small as the initialization (value=0.5): scales above 1 leave them, so the final
    # shift inside is exercised.
    model, opt, batches = _setup(_mlp, value=0.5)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    sets = _sets(opt)
    result = sfw_init(model, opt, batches, iters=20, lr=0.2)
    shifted = 0
    for name, p in model.named_parameters():
        assert sets[name].contains(p.detach()), name
        unshifted = initial[name] * result.scales[name]
        shifted += int(sets[name].scale_factor(unshifted) > 1.0 + 1e-6)
        assert _cosine(p.detach(), initial[name]) == pytest.approx(1.0, abs=1e-6), name
    assert shifted >= 1  # the test did exercise the shift inside


def test_model_equals_copy_scaled_by_returned_scales_then_shifted_inside() -> None:
    model, opt, batches = _setup(_conv_bn, value=0.5)
    reference = copy.deepcopy(model)
    sets = _sets(opt)
    result = sfw_init(model, opt, batches, iters=10, lr=0.1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(sets[name].shift_inside(p * result.scales[name]))
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    model.eval()
    reference.eval()
    x = batches[0][0]
    torch.testing.assert_close(model(x), reference(x))


def test_min_scale_is_respected() -> None:
    # Loss ||f(x)||² rewards shrinking every tensor: a large lr drives the scales to the floors.
    model, opt, batches = _setup(_mlp)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = sfw_init(
        model, opt, batches, iters=30, lr=0.5, min_scale=0.3, loss_fn=lambda out, y: (out**2).mean()
    )
    weights = {n: a for n, a in result.scales.items() if not n.endswith("bias")}
    assert all(a >= 0.3 for a in weights.values())
    assert any(a == pytest.approx(0.3) for a in weights.values())
    assert all(a >= 0.0 for a in result.scales.values())
    for name, p in model.named_parameters():
        ratio = float(p.detach().norm() / initial[name].norm())
        # Large sets (value=15): the shift inside does nothing, the norm ratio is the scale.
        assert ratio == pytest.approx(result.scales[name], rel=1e-5)
        if name in weights:
            assert ratio >= 0.3 - 1e-6


def test_bias_floor_is_zero() -> None:
    model, opt, batches = _setup(_mlp)
    result = sfw_init(
        model, opt, batches, iters=30, lr=0.5, min_scale=0.3, loss_fn=lambda out, y: (out**2).mean()
    )
    assert min(a for n, a in result.scales.items() if n.endswith("bias")) < 0.3


def test_bn_running_stats_flags_and_optimizer_untouched() -> None:
    model, opt, batches = _setup(_conv_bn)
    model.eval()
    model[1].train()  # a mixed state, to be restored exactly
    stats = {n: b.clone() for n, b in model.named_buffers()}
    flags = [m.training for m in model.modules()]
    state_before = copy.deepcopy(opt.state_dict())
    sfw_init(model, opt, batches, iters=5, lr=0.1)
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n
    assert [m.training for m in model.modules()] == flags
    assert len(opt.state) == 0
    assert opt.state_dict()["param_groups"] == state_before["param_groups"]
    # The optimizer still holds the model's (rescaled) tensors and steps them.
    x, y = batches[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_default_iters_is_the_number_of_batches() -> None:
    model, opt, batches = _setup(_mlp)
    assert sfw_init(model, opt, batches).iters == len(batches)


def test_a_generator_needs_iters() -> None:
    model, opt, batches = _setup(_mlp)
    with pytest.raises(ValueError, match="Invalid iters: None"):
        sfw_init(model, opt, (b for b in batches))
    result = sfw_init(model, opt, (b for b in batches), iters=len(batches))
    assert result.iters == len(batches)


def test_float64_model_keeps_dtype() -> None:
    model, opt, batches = _setup(_mlp)
    model.double()
    batches = [(x.double(), y) for x, y in batches]
    result = sfw_init(model, opt, batches, iters=3, lr=0.1)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert len(result.objective) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    # float64: no TF32 convolutions on the GPU, so both devices compute the same objective (Adam
    # is sign-like, and in float32 a tiny gradient can flip a step and change the scales).
    model, opt, batches = _setup(_conv_bn, value=0.5)
    model.double()
    batches = [(x.double(), y) for x, y in batches]
    model_gpu = copy.deepcopy(model).cuda()
    params = model_gpu.parameters()
    opt_gpu = SFW([{**g, "params": [p]} for g, p in zip(opt.param_groups, params, strict=True)])
    cpu = sfw_init(model, opt, batches, iters=5, lr=0.1)
    gpu = sfw_init(model_gpu, opt_gpu, batches, iters=5, lr=0.1)  # CPU batches are moved
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-9)
    for name in cpu.scales:
        assert gpu.scales[name] == pytest.approx(cpu.scales[name], rel=1e-9, abs=1e-12)
    sets = _sets(opt_gpu)
    for name, p in model_gpu.named_parameters():
        assert p.is_cuda and sets[name].contains(p.detach()), name
        torch.testing.assert_close(p.cpu(), dict(model.named_parameters())[name])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iters": 0}, "Invalid iters: 0"),
        ({"iters": 2.5}, "Invalid iters: 2.5"),
        ({"lr": 0.0}, "Invalid lr: 0.0"),
        ({"lr": float("nan")}, "Invalid lr: nan"),
        ({"min_scale": -0.1}, "Invalid min_scale: -0.1"),
        ({"min_scale": 1.5}, "Invalid min_scale: 1.5"),
        ({"grad_clip": 0}, "Invalid grad_clip: 0"),
        ({"grad_clip": "1"}, "Invalid grad_clip: '1'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    model, opt, batches = _setup(_mlp)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        sfw_init(model, opt, batches, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_bad_optimizers_raise() -> None:
    model, opt, batches = _setup(_mlp)
    with pytest.raises(ValueError, match="Invalid optimizer: SGD"):
        sfw_init(model, torch.optim.SGD(model.parameters(), lr=0.1), batches)
    partial = SFW([g for g in opt.param_groups if g["name"] != "2.weight"])
    with pytest.raises(ValueError, match="no param group for \\['2.weight'\\]"):
        sfw_init(model, partial, batches)
    foreign = SFW([*opt.param_groups, {"params": [nn.Parameter(torch.zeros(2))]}])
    with pytest.raises(ValueError, match="not a trainable parameter of the model"):
        sfw_init(model, foreign, batches)
    zero_lr = SFW(copy.copy(opt.param_groups), lr=0.0)
    for g in zero_lr.param_groups:
        g["lr"] = 0.0
    with pytest.raises(ValueError, match="Invalid optimizer lr: 0.0"):
        sfw_init(model, zero_lr, batches)
