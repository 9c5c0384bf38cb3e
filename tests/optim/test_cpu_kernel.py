"""The compiled K-sparse step (optim._cpu_kernel) against a plain dense NumPy step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sfwprune import SFW, make_constraint
from sfwprune.optim import _cpu_kernel as ck
from sfwprune.optim.finite import finite_flags

pytestmark = pytest.mark.skipif(not ck.AVAILABLE, reason="numba is not installed")


def _reference(theta, m, g, first, rho, k, radius, lr):
    """Dense SFW step: stable argsort (ties keep the lowest indices), vertex, η, update."""
    m[:] = g if first else rho * m + (1 - rho) * g
    idx = np.argsort(-np.abs(m), kind="stable")[:k]
    v = np.zeros_like(m)
    v[idx] = -radius * np.sign(m[idx])
    d = (v - theta).astype(np.float64)
    d2 = float(d @ d)
    mm = float(m.astype(np.float64) @ m)
    eta = min(max(lr * math.sqrt(mm / d2), 0.0), 1.0) if d2 > 0 else 0.0
    theta += (eta * d).astype(theta.dtype)


def _run(n, k, dtype, steps, grad, rtol):
    """The kernel (through kernel_step_) and the dense step side by side; returns the
    tensor's TensorKernel (threshold statistics)."""
    rng = np.random.default_rng(n + k)
    theta = (rng.standard_normal(n) * 0.01).astype(dtype)
    theta_ref, m_ref = theta.copy(), np.zeros(n, dtype)
    p = torch.from_numpy(theta)
    group = {"k": k, "radius": 0.7, "lr": 0.5, "momentum": 0.9, "rescale": "gradient"}
    state, cache = {p: {}}, {}
    for step in range(steps):
        g = grad(rng, step).astype(dtype)
        assert ck.all_finite(g)
        p.grad = torch.from_numpy(g)
        ck.kernel_step_([(group, p)], state, cache, {})
        _reference(theta_ref, m_ref, g, step == 0, 0.9, k, 0.7, 0.5)
        np.testing.assert_allclose(theta, theta_ref, rtol=rtol, atol=rtol * 1e-2)
        # lerp vs ρm + (1-ρ)g: equal up to rounding, absolute near 0
        np.testing.assert_allclose(state[p]["momentum_buffer"].numpy(), m_ref, rtol=rtol,
                                   atol=rtol * 1e-1)  # fmt: skip
    return cache[id(p)]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
@pytest.mark.parametrize("n,k", [(40000, 2000), (40000, 1), (40000, 40000), (300, 15), (7, 7)])
def test_kernel_matches_dense_reference(n, k, dtype, rtol) -> None:
    drift = lambda rng, step: rng.standard_normal(n) * (1 + 0.05 * step)  # noqa: E731
    st = _run(n, k, dtype, 12, drift, rtol)
    if n > ck.SMALL and 4 * k <= n:
        assert st.full == 1  # only the first step partitions everything; then the band holds


def test_band_misses_retry_and_stay_exact() -> None:
    n, k = 50000, 2500
    # the gradient's scale jumps, so t moves far from ||m||'s prediction in both directions
    scales = [1, 1, 1, 40, 40, 0.01, 0.01, 1, 5, 0.2, 1, 1]
    st = _run(n, k, np.float64, len(scales),
              lambda rng, step: rng.standard_normal(n) ** 3 * scales[step], 1e-10)  # fmt: skip
    assert st.retries > 0


def test_ties_at_the_threshold_keep_the_lowest_indices() -> None:
    n, k = 30000, 1000
    # magnitudes in {1, 2, 3}: the K-th value is tied many times over, every step
    grad = lambda rng, step: rng.integers(1, 4, n) * rng.choice([-1.0, 1.0], n)  # noqa: E731
    _run(n, k, np.float64, 4, grad, 1e-10)
    _run(300, 20, np.float64, 4, lambda rng, step: rng.integers(1, 4, 300) * 1.0, 1e-10)


def test_mostly_zero_momentum_k_above_the_nonzeros() -> None:
    n, k = 40000, 4000

    def grad(rng, step):
        g = np.zeros(n)
        g[rng.choice(n, 500, replace=False)] = rng.standard_normal(500)
        return g

    _run(n, k, np.float64, 5, grad, 1e-10)


def test_non_finite_gradients_are_flagged() -> None:
    n = 40000
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in (np.float64, np.float32):
            g = np.ones(n, dtype)
            g[123] = bad
            assert not ck.all_finite(g)
    assert ck.all_finite(np.full(n, 1e300))  # huge, finite
    assert ck.all_finite(np.full(n, 3e38, np.float32))
    # ||m||² overflows to inf: the kernel hands the tensor to the reference update
    assert ck._momentum_pass(np.full(n, 1e300), np.full(n, 1e300), 0.1, ck.MODE_LERP) == math.inf


def test_finite_flags_exact_for_huge_values() -> None:
    big = torch.full((50000,), 3e38)  # float32: the sum of squares overflows, values do not
    nan = torch.zeros(50000)
    nan[7] = float("nan")
    strided = torch.zeros(100, 20).t()  # not contiguous: the torch route
    strided[3, 4] = float("inf")
    flags = finite_flags([big, nan, strided, torch.zeros(3, dtype=torch.float64)])
    assert flags.tolist() == [True, False, False, True]


def _sfw_pair(grad_of, steps=5):
    """(SFW with the kernel, SFW with the reference loop) on one 200x150 K-sparse weight."""
    out = []
    for foreach in (True, False):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(200, 150, dtype=torch.float64) * 0.01)
        cset = make_constraint("k_sparse", w.numel(), k=1500, radius=0.3)
        opt = SFW([{"params": [w], **cset.to_group()}], lr=0.7, foreach=foreach)
        for step in range(steps):
            w.grad = grad_of(step)
            opt.step()
        out.append((w.detach().clone(), opt.state[w]["momentum_buffer"].clone()))
    return out


def test_optimizer_kernel_path_with_non_contiguous_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(150, 200, generator=gen, dtype=torch.float64).t() for _ in range(5)]
    assert not grads[0].is_contiguous()
    (w1, m1), (w2, m2) = _sfw_pair(lambda step: grads[step])
    torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m1, m2, rtol=1e-10, atol=1e-12)


def _named_group(p: nn.Parameter, k: int, name: str) -> dict:
    """A K-sparse group (radius 1) of one tensor, named for the refusal message."""
    return {"params": [p], **make_constraint("k_sparse", p.numel(), k=k, radius=1.0).to_group(),
            "name": name}  # fmt: skip


def test_refused_step_leaves_weights_and_momentum_unchanged() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(300, 100))
    b = nn.Parameter(torch.randn(10))
    opt = SFW([_named_group(w, 600, "w"), _named_group(b, 2, "b")], lr=1.0)
    for _ in range(3):
        w.grad, b.grad = torch.randn(300, 100), torch.randn(10)
        opt.step()
    before = (w.detach().clone(), b.detach().clone(),
              opt.state[w]["momentum_buffer"].clone(), opt.state[b]["momentum_buffer"].clone())  # fmt: skip
    w.grad = torch.randn(300, 100)
    b.grad = torch.randn(10)
    b.grad[4] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in param group 'b'"):
        opt.step()
    after = (w, b, opt.state[w]["momentum_buffer"], opt.state[b]["momentum_buffer"])
    for x, y in zip(before, after):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rescale", ["diameter", None])
def test_fixed_step_sizes_match_reference(rescale) -> None:
    out = []
    for foreach in (True, False):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(n, dtype=torch.float64) * 0.01) for n in (50, 40000)]
        groups = [{"params": [p], **make_constraint("k_sparse", p.numel(), k=p.numel() // 20,
                                                    radius=0.4).to_group()} for p in params]  # fmt: skip
        opt = SFW(groups, lr=0.3, rescale=rescale, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        out.append([p.detach().clone() for p in params])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_refused_first_step_and_mixed_dtypes_change_nothing() -> None:
    """The kernel checks every gradient (all dtypes) before it writes any momentum; a refused
    first step leaves no momentum buffer behind."""
    torch.manual_seed(0)
    w32 = nn.Parameter(torch.randn(200, 100))
    w64 = nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = SFW([_named_group(w32, 900, "w32"), _named_group(w64, 5, "w64")], lr=1.0)
    w32.grad, w64.grad = torch.randn(200, 100), torch.randn(50, dtype=torch.float64)
    w64.grad[7] = float("inf")
    before = (w32.detach().clone(), w64.detach().clone())
    with pytest.raises(ValueError, match="param group 'w64'"):
        opt.step()
    assert torch.equal(before[0], w32) and torch.equal(before[1], w64)
    assert "momentum_buffer" not in opt.state[w32] and "momentum_buffer" not in opt.state[w64]
    w64.grad[7] = 0.0
    opt.step()
    m32 = opt.state[w32]["momentum_buffer"].clone()
    w32.grad[3, 3] = float("nan")
    before = (w32.detach().clone(), w64.detach().clone(), opt.state[w64]["momentum_buffer"].clone())
    with pytest.raises(ValueError, match="param group 'w32'"):
        opt.step()
    assert torch.equal(before[0], w32) and torch.equal(before[1], w64)
    assert torch.equal(m32, opt.state[w32]["momentum_buffer"])
    assert torch.equal(before[2], opt.state[w64]["momentum_buffer"])


def test_unchecked_non_finite_gradient_takes_the_reference_update() -> None:
    """check_finite=False: a NaN gradient steps (through the reference update) like the loop."""
    out = []
    for foreach in (True, False):
        w = nn.Parameter(torch.linspace(-1, 1, 40, dtype=torch.float64))
        cset = make_constraint("k_sparse", 40, k=4, radius=1.0)
        opt = SFW([{"params": [w], **cset.to_group()}], lr=0.5, foreach=foreach,
                  check_finite=False)  # fmt: skip
        w.grad = torch.ones(40, dtype=torch.float64)
        opt.step()
        w.grad = torch.ones(40, dtype=torch.float64)
        w.grad[5] = float("nan")
        opt.step()
        out.append((w.detach().clone(), opt.state[w]["momentum_buffer"].clone()))
    torch.testing.assert_close(out[0][0], out[1][0], equal_nan=True)
    torch.testing.assert_close(out[0][1], out[1][1], equal_nan=True)
