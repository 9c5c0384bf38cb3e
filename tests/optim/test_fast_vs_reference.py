"""The fast SFW step (compiled, NumPy and torch kernels) against the reference loop; top-K."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from sfwprune import SFW, make_constraint
from sfwprune.optim import cpu_kernel, fast
from sfwprune.optim.topk import SMALL, TopKTracker, select_top_k, topk_abs_indices


class Net(nn.Module):
    """Tensors of every size class: small, medium and large (> topk.SMALL)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # 216 + 8
        self.bn = nn.BatchNorm2d(8)  # 8 + 8
        self.fc1 = nn.Linear(288, 72)  # 20736 (> SMALL) + 72
        self.fc2 = nn.Linear(72, 80)  # 5760 + 80
        self.fc3 = nn.Linear(80, 5)  # 400 + 5
        self.unused = nn.Parameter(torch.randn(7))  # never gets a gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(torch.relu(self.conv(x))).flatten(1)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


# name -> (kind, k, p, radius); one group per tensor, plus one group of two tensors below
SETS = {
    "conv.weight": ("l1", None, None, 2.0),
    "conv.bias": ("lp", None, 2.0, 0.5),
    "bn.weight": ("linf", None, None, 1.5),
    "bn.bias": ("unconstrained", None, None, None),
    "fc1.weight": ("k_sparse", 1036, None, 0.05),
    "fc1.bias": ("k_sparse", 72, None, 0.2),  # K = n: every coordinate
    "fc2.weight": ("k_support", 288, None, 3.0),
    "fc3.weight": ("lp", None, 3.0, 2.0),
    "unused": ("k_sparse", 2, None, 1.0),
}
# some groups with their own hyperparameters
OVERRIDES = {
    "conv.bias": {"lr": 0.3, "momentum": 0.5, "rescale": "diameter"},
    "fc2.weight": {"lr": 0.05, "rescale": None},
    "fc1.bias": {"momentum": 0.5},
    "bn.bias": {"lr": 0.1},
}


def _build(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    params = dict(model.named_parameters())
    groups = []
    for name, (kind, k, p, radius) in SETS.items():
        param = params[name]
        cset = make_constraint(kind, param.numel(), k=k, p=p, radius=radius)
        with torch.no_grad():
            param.copy_(cset.shift_inside(param))
        groups.append(
            {"params": [param], "name": name, **cset.to_group(), **OVERRIDES.get(name, {})}
        )
    # a group of two tensors with one set kind (the L_inf ball of radius 0.3)
    groups.append({"params": [params["fc2.bias"], params["fc3.bias"]], "constraint": "linf",
                   "radius": 0.3, "name": "biases"})  # fmt: skip
    return model, groups


def _data(dtype: torch.dtype, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=gen, dtype=dtype),
             torch.randint(0, 5, (16,), generator=gen)) for _ in range(3)]  # fmt: skip


# Which fast kernel CPU tensors take: the compiled one (numba), NumPy's, or torch's (as on GPU).
PATHS = ["kernel", "numpy", "torch"]


def _use_path(opt: SFW, path: str) -> None:
    if path == "kernel" and not cpu_kernel.AVAILABLE:
        pytest.skip("numba is not installed (pip install sfwprune[fast])")
    opt._fast_cache.use_numpy = path != "torch"
    opt._fast_cache.use_kernel = path == "kernel"


def _train(dtype: torch.dtype, foreach: bool, path: str = "kernel", steps: int = 12,
           diagnostics: bool = False) -> tuple[nn.Module, SFW, list]:  # fmt: skip
    model, groups = _build(dtype)
    opt = SFW(groups, lr=0.8, momentum=0.9, foreach=foreach, diagnostics=diagnostics)
    _use_path(opt, path)
    rows = []
    for step in range(steps):
        x, y = _data(dtype)[step % 3]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rows.append(opt.diagnostics)
    return model, opt, rows


def _assert_same(a: tuple, b: tuple, rtol: float, atol: float) -> None:
    (model_a, opt_a, _), (model_b, opt_b, _) = a, b
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, rtol=rtol, atol=atol), name
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        if "momentum_buffer" in sa:
            assert torch.allclose(sa["momentum_buffer"], sb["momentum_buffer"], rtol=rtol,
                                  atol=atol), name  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_fast_equals_reference_float64(path: str) -> None:
    ref = _train(torch.float64, foreach=False)
    out = _train(torch.float64, foreach=True, path=path)
    _assert_same(ref, out, rtol=1e-9, atol=1e-12)
    # the unused parameter never moved and has no state
    assert torch.equal(out[0].unused, _build(torch.float64)[0].unused)
    assert out[0].unused not in out[1].state


@pytest.mark.parametrize("path", PATHS)
def test_fast_equals_reference_float32(path: str) -> None:
    # Fewer steps: float32 rounding differences grow ~3x per step in this small, fast-moving net.
    ref = _train(torch.float32, foreach=False, steps=6)
    out = _train(torch.float32, foreach=None, path=path, steps=6)
    _assert_same(ref, out, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_diagnostics_match_reference(path: str) -> None:
    _, _, ref = _train(torch.float64, foreach=False, steps=4, diagnostics=True)
    _, _, out = _train(torch.float64, foreach=True, path=path, steps=4,
                       diagnostics=True)  # fmt: skip
    for rows_ref, rows_out in zip(ref, out):
        assert [r["name"] for r in rows_ref] == [r["name"] for r in rows_out]
        assert len(rows_out) == sum(1 for n in SETS if n != "unused") + 2
        for r, o in zip(rows_ref, rows_out):
            assert torch.allclose(o["step_size"], r["step_size"], rtol=1e-9), r["name"]
            if r["fw_gap"] is None:
                assert o["fw_gap"] is None
            else:
                assert torch.allclose(o["fw_gap"], r["fw_gap"], rtol=1e-9, atol=1e-12), r["name"]
                assert float(o["fw_gap"]) >= -1e-9  # <m, θ - v> >= 0 since θ is in the set


def test_channels_last_and_strided_params_match_reference() -> None:
    def run(foreach: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        conv = nn.Conv2d(4, 6, 3).double().to(memory_format=torch.channels_last)
        strided = nn.Parameter(torch.randn(40, dtype=torch.float64)[::2])  # not dense
        groups = [
            {"params": [conv.weight], **make_constraint("k_sparse", 216, k=9, radius=0.2).to_group()},
            {"params": [strided], **make_constraint("k_sparse", 20, k=3, radius=0.5).to_group()},
        ]  # fmt: skip
        opt = SFW(groups, lr=0.5, foreach=foreach)
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
            opt.zero_grad()
            (conv(x).square().mean() + (strided * torch.arange(20.0)).sum().sin()).backward()
            opt.step()
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        return [conv.weight.detach().clone(), strided.detach().clone()]

    for a, b in zip(run(False), run(True)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_state_dict_round_trip_and_new_storage_steps_in_lockstep() -> None:
    model_a, opt_a, _ = _train(torch.float64, foreach=True, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b, groups_b = _build(torch.float64)
    model_b.load_state_dict(saved["model"])
    opt_b = SFW(groups_b, lr=0.8, momentum=0.9)
    opt_b.load_state_dict(saved["opt"])
    for step in range(3):
        x, y = _data(torch.float64)[step]
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if step == 1:  # new storage behind a parameter: the cached plan must notice
            model_a.fc1.weight.data = model_a.fc1.weight.data.clone()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-12, atol=1e-14)


def test_numpy_kernel_bumps_the_version_counter() -> None:
    model, groups = _build(torch.float32)
    opt = SFW(groups, lr=0.5)
    x, y = _data(torch.float32)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = {name: p._version for name, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert (p._version > before[name]) == (name != "unused"), name


def test_invalid_foreach() -> None:
    with pytest.raises(ValueError, match="Invalid foreach"):
        SFW([nn.Parameter(torch.zeros(3))], foreach="yes")  # type: ignore[arg-type]


# ---- ties: the vertex must be an LMO minimizer, whichever tied coordinates it keeps ----------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [40, SMALL + 4000])
def test_ties_give_a_valid_vertex(path: str, n: int) -> None:
    k, radius, eta = n // 10, 0.5, 0.25
    gen = torch.Generator().manual_seed(n)
    # magnitudes in {1, 2, 3}: many ties at the K-th value; random signs
    grad = torch.randint(1, 4, (n,), generator=gen).double()
    grad *= torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64) * 0.01
    param = nn.Parameter(theta0.clone())
    group = {"params": [param], **make_constraint("k_sparse", n, k=k, radius=radius).to_group()}
    opt = SFW([group], lr=eta, momentum=0.0, rescale=None)
    _use_path(opt, path)
    param.grad = grad
    opt.step()
    v = (param.detach() - (1 - eta) * theta0) / eta  # θ1 = (1-η)θ0 + ηv
    support = v.abs() > radius / 2
    assert int(support.sum()) == k
    assert torch.allclose(v[support].abs(), torch.full((k,), radius, dtype=torch.float64))
    assert torch.allclose(v[~support], torch.zeros(n - k, dtype=torch.float64), atol=1e-12)
    best = -radius * torch.topk(grad.abs(), k).values.sum()  # min over the set of <g, v>
    assert torch.isclose(torch.dot(grad, v), best)


# ---- the top-K selection itself ----------------------------------------------------------


def _reference_top(a: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-a, kind="stable")[:k])


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (50, 50), (SMALL + 1, 7), (60000, 3000)])
def test_select_top_k_matches_a_sort(n: int, k: int) -> None:
    a = np.abs(np.random.default_rng(n).standard_normal(n))
    for guess in (None, 0.0, 1e-9, 0.5, 1e9, float("nan")):
        idx, kth, _ = select_top_k(a, k, guess)
        assert np.array_equal(idx, _reference_top(a, k))
        assert kth == a[idx].min()


def test_select_top_k_ties_keep_lowest_indices() -> None:
    a = np.array([1.0, 2.0, 2.0, 0.0, 2.0, 3.0, 2.0])
    assert select_top_k(a, 3)[0].tolist() == [1, 2, 5]
    zeros = np.zeros(SMALL + 10)
    zeros[[5, 9000]] = 1.0
    assert select_top_k(zeros, 4)[0].tolist() == [0, 1, 5, 9000]


def test_select_top_k_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="Invalid k"):
        select_top_k(np.ones(4), 5)


def test_tracker_stays_exact_as_the_array_drifts() -> None:
    rng = np.random.default_rng(0)
    n, k = 3 * SMALL, 1500
    m = rng.standard_normal(n)
    tracker = TopKTracker()
    for step in range(30):
        m = 0.9 * m + 0.1 * rng.standard_normal(n) * (1 + 0.3 * math.sin(step))
        if step == 15:
            m[:50] *= 100.0  # a jump no prediction sees coming
        idx, m_s = tracker.select(m, k, float(m @ m))
        assert np.array_equal(idx, _reference_top(np.abs(m), k))
        assert np.array_equal(m_s, m[idx])
    m[7] = np.nan  # NaN counts as the largest, as in torch.topk
    idx, _ = tracker.select(m, k, float(m @ m))
    assert 7 in idx and idx.size == k


def test_topk_abs_indices() -> None:
    x = torch.tensor([0.1, -3.0, 2.0, 0.0])
    assert topk_abs_indices(x, 2).sort().values.tolist() == [1, 2]
    big = torch.randn(SMALL * 2, generator=torch.Generator().manual_seed(0))
    expected = torch.topk(big.abs(), 100).indices.sort().values
    assert torch.equal(topk_abs_indices(big, 100).sort().values, expected)
    half = big.half()  # torch.topk path; rounding to half creates ties: compare the values
    chosen = half.abs()[topk_abs_indices(half, 100)].sort().values
    assert torch.equal(chosen, torch.topk(half.abs(), 100).values.sort().values)


def test_a_missing_cache_is_rebuilt() -> None:
    model, groups = _build(torch.float64)
    opt = SFW(groups, lr=0.5)
    del opt._fast_cache  # as after unpickling: torch.optim.Optimizer keeps only its state
    x, y = _data(torch.float64)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert isinstance(opt._fast_cache, fast.FastStepCache)


# ---- unusual inputs: the fast paths do what the reference does ----------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rescale", ["gradient", None])
@pytest.mark.parametrize("n", [9, SMALL + 100])
def test_nan_gradient_unchecked_matches_reference(path: str, rescale, n: int) -> None:
    """check_finite=False: a NaN gradient poisons exactly what it poisons in the reference
    (torch.sign(NaN) = 0 in the vertex, NaN in ||m|| and so in a gradient-scaled η)."""
    out = []
    for foreach in (None, False):
        p = nn.Parameter(torch.linspace(-0.05, 0.05, n, dtype=torch.float64))
        group = {"params": [p], **make_constraint("k_sparse", n, k=4, radius=1.0).to_group()}
        opt = SFW([group], lr=0.05, rescale=rescale, check_finite=False, foreach=foreach)
        if foreach is None:
            _use_path(opt, path)
        g = torch.linspace(1.0, 2.0, n, dtype=torch.float64)  # no ties at the K-th value
        g[3] = float("nan")
        p.grad = g
        opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], equal_nan=True)


def test_sfw_step_fast_works_outside_no_grad() -> None:
    p = nn.Parameter(torch.zeros(10))
    p.grad = torch.randn(10)
    group = {"params": [p], "constraint": "unconstrained", "lr": 0.1, "momentum": 0.9,
             "rescale": "gradient", "k": None, "p": None, "radius": None}  # fmt: skip
    fast.sfw_step_fast([group], {p: {}}, None, fast.FastStepCache())
    assert torch.allclose(p.detach(), -0.1 * p.grad)


@pytest.mark.parametrize("path", PATHS)
def test_autograd_versions_bumped_one_tensor_at_a_time(path, monkeypatch) -> None:
    """torch < 2.5's increment_version takes one tensor, not a list."""

    def one_tensor(t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise RuntimeError("increment_version expect a Tensor as input")
        torch.autograd.graph.increment_version(t)

    monkeypatch.setattr(fast, "_increment_version", one_tensor)
    out = _train(torch.float64, foreach=True, path=path, steps=2)
    ref = _train(torch.float64, foreach=False, steps=2)
    _assert_same(ref, out, rtol=1e-9, atol=1e-12)
