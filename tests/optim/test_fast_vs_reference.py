"""The fast SFW paths (compiled CPU kernel, batched torch step) against the reference loop."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from sfwprune import SFW, make_constraint
from sfwprune.optim import _batched, _cpu_kernel
from sfwprune.optim._cpu_kernel import SMALL
from sfwprune.optim.sfw import dispatch


class Net(nn.Module):
    """Tensors of every size class: small, medium and large (> _cpu_kernel.SMALL)."""

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


# Which fast path K-sparse CPU tensors take: the compiled kernel (numba) or the batched torch
# step (as on GPU), chosen with the public `fused` switch.
PATHS = ["kernel", "torch"]


def _use_path(opt: SFW, path: str) -> None:
    if path == "kernel" and not _cpu_kernel.AVAILABLE:
        pytest.skip("numba is not installed")
    for group in opt.param_groups:
        group["fused"] = None if path == "kernel" else False


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
def test_diagnostics_take_the_reference_path_and_change_nothing_else(path: str) -> None:
    """diagnostics=True routes every group to the reference loop (the documented rule), so
    turning it on changes the weights only by rounding, and rows come from the reference."""
    plain = _train(torch.float64, foreach=None, path=path, steps=4)
    model, opt, rows = _train(torch.float64, foreach=None, path=path, steps=4, diagnostics=True)
    _assert_same(plain, (model, opt, rows), rtol=1e-9, atol=1e-12)
    reference, kernel, batched = dispatch(opt.param_groups)
    assert kernel == [] and batched == [] and len(reference) == len(opt.param_groups) - 1
    _, _, ref = _train(torch.float64, foreach=False, steps=4, diagnostics=True)
    for rows_ref, rows_out in zip(ref, rows):
        assert [r["name"] for r in rows_ref] == [r["name"] for r in rows_out]
        assert len(rows_out) == sum(1 for n in SETS if n != "unused") + 2
        for r, o in zip(rows_ref, rows_out):
            assert torch.allclose(o["step_size"], r["step_size"], rtol=1e-9), r["name"]
            if r["fw_gap"] is None:
                assert o["fw_gap"] is None
            else:
                assert float(o["fw_gap"]) >= -1e-9  # <m, θ - v> >= 0 since θ is in the set


def test_dispatch_rule() -> None:
    """K-sparse groups take a fast path; every other kind (and foreach=False) the reference."""
    model, groups = _build(torch.float64)
    opt = SFW(groups, lr=0.5)
    x, y = _data(torch.float64)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    reference, kernel, batched = dispatch(opt.param_groups)
    ref_kinds = {g["constraint"] for _, g, _ in reference}
    assert "k_sparse" not in ref_kinds and "unconstrained" in ref_kinds
    fast = kernel + batched
    assert {g["constraint"] for g, _ in fast} == {"k_sparse"}
    assert all(p is not model.unused for _, p in fast)  # no gradient: not stepped at all
    assert (len(kernel) > 0) == _cpu_kernel.AVAILABLE
    for group in opt.param_groups:
        group["fused"] = False
    assert dispatch(opt.param_groups)[1] == []
    # a kind the fast paths do not know (e.g. a new one) goes to the reference loop
    for group in opt.param_groups:
        group["constraint"] = (
            "some_new_kind" if group["constraint"] == "k_sparse" else group["constraint"]
        )
    reference, kernel, batched = dispatch(opt.param_groups)
    assert kernel == [] and batched == []


def test_switches_are_group_defaults_and_survive_pickle_and_state_dict() -> None:
    model, groups = _build(torch.float64)
    opt = SFW(groups, lr=0.5, fused=False, check_finite=False, cuda_graph=False)
    assert all(g["fused"] is False and g["check_finite"] is False for g in opt.param_groups)
    twin = copy.deepcopy(opt)
    assert [g["fused"] for g in twin.param_groups] == [False] * len(groups)
    again = pickle.loads(pickle.dumps(opt))
    assert again.defaults["cuda_graph"] is False and again.diagnostics == []
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["param_groups"][0]["fused"] is False
    for g in sd["param_groups"]:  # a state dict from before the switches existed still steps
        for name in ("foreach", "fused", "cuda_graph", "check_finite", "diagnostics"):
            del g[name]
    _, groups_b = _build(torch.float64)
    opt_b = SFW(groups_b, lr=0.5)
    opt_b.load_state_dict(sd)
    x, y = _data(torch.float64)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    twin.step()  # deep copy: its own caches, built on the first step


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"fused": "yes"}, "fused: 'yes'"), ({"cuda_graph": None}, "cuda_graph: None"),
     ({"fused": True, "foreach": False}, "fused: True with foreach=False")],
)  # fmt: skip
def test_invalid_switches(kwargs, bad) -> None:
    with pytest.raises(ValueError, match="Invalid") as info:
        SFW([nn.Parameter(torch.zeros(3))], **kwargs)
    assert bad in str(info.value)


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


def test_kernel_bumps_the_version_counter() -> None:
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


def test_fast_paths_work_outside_no_grad() -> None:
    for fused in (None, False):
        p = nn.Parameter(torch.zeros(10))
        p.grad = torch.randn(10)
        group = {"params": [p], "constraint": "k_sparse", "k": 3, "radius": 1.0, "lr": 0.1,
                 "momentum": 0.9, "rescale": None}  # fmt: skip
        if fused is None and _cpu_kernel.AVAILABLE:
            _cpu_kernel.kernel_step_([(group, p)], {p: {}}, {}, {})
        else:
            _batched.batched_step_([(group, p)], {p: {}}, {}, graphs=False)
        assert int((p.detach() != 0).sum()) == 3


@pytest.mark.parametrize("path", PATHS)
def test_autograd_versions_bumped_one_tensor_at_a_time(path, monkeypatch) -> None:
    """torch < 2.5's increment_version takes one tensor, not a list."""

    def one_tensor(t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise RuntimeError("increment_version expect a Tensor as input")
        torch.autograd.graph.increment_version(t)

    monkeypatch.setattr(_cpu_kernel, "_increment_version", one_tensor)
    out = _train(torch.float64, foreach=True, path=path, steps=2)
    ref = _train(torch.float64, foreach=False, steps=2)
    _assert_same(ref, out, rtol=1e-9, atol=1e-12)
