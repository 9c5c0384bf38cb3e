"""Reconstruction: exact solves vs brute force, conv as unfold-matmul, solvers agree, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfwprune.models.registry import build_model
from sfwprune.prune import prune_, reconstruct_
from sfwprune.prune.calibration import (
    LayerInputs,
    as_rows,
    out_rows,
    rows_per_sample,
    sample_out_rows,
    sample_rows,
    weight_matrix,
)
from sfwprune.prune.solvers import choose, quadratic_error, ridge_of, solve_exact, solve_obs


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def stats(seed: int = 0, rows: int = 60, d: int = 9, out: int = 4, p_keep: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, d, generator=g, dtype=torch.float64)
    Y = torch.randn(rows, out, generator=g, dtype=torch.float64)
    keep = torch.rand(out, d, generator=g) < p_keep
    keep[0] = True  # one full row, one empty row
    keep[1] = False
    return X, Y, keep


def brute_force(X, Y, keep, lam):
    """Per unit: lstsq of [X_S; √λ I] w = [y; 0] (the ridge objective, no normal equations)."""
    W = torch.zeros(keep.shape, dtype=X.dtype)
    for r in range(keep.shape[0]):
        S = keep[r].nonzero().squeeze(1)
        if len(S) == 0:
            continue
        A = torch.cat([X[:, S], lam**0.5 * torch.eye(len(S), dtype=X.dtype)])
        b = torch.cat([Y[:, r], torch.zeros(len(S), dtype=X.dtype)])
        W[r, S] = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return W


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_solver_equals_brute_force_least_squares(seed, monkeypatch):
    X, Y, keep = stats(seed)
    lam = 0.05
    want = brute_force(X, Y, keep, lam)
    got = solve_exact(X.T @ X, X.T @ Y, keep, lam)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # tiny batches: the padding and batching logic gives the same answer
    monkeypatch.setattr("sfwprune.prune.solvers.BATCH_ELEMENTS", 10)
    torch.testing.assert_close(solve_exact(X.T @ X, X.T @ Y, keep, lam), want)


def test_exact_solver_batches_units_of_uneven_kept_counts():
    # global magnitude leaves |S_r| from 1 to most of the row: batches of similar |S| (several
    # of them here), each padded to its largest, must still give every unit its own solution
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 40, generator=g, dtype=torch.float64)
    Y = torch.randn(400, 30, generator=g, dtype=torch.float64)
    counts = torch.tensor([1, 1, 2, 3, 5, 8, 13, 21, 34, 40] * 3)
    keep = torch.zeros(30, 40, dtype=torch.bool)
    for r, c in enumerate(counts.tolist()):
        keep[r, torch.randperm(40, generator=g)[:c]] = True
    torch.testing.assert_close(
        solve_exact(X.T @ X, X.T @ Y, keep, 0.05), brute_force(X, Y, keep, 0.05),
        rtol=1e-9, atol=1e-10,
    )  # fmt: skip


def test_obs_is_exact_without_pruning_and_agrees_with_exact_solves():
    X, Y, _ = stats(3, rows=200, d=30, out=6)
    H, B, yy = X.T @ X, X.T @ Y, (Y**2).sum(0)
    full = torch.ones(6, 30, dtype=torch.bool)
    torch.testing.assert_close(solve_obs(H, B, full, 1e-3), solve_exact(H, B, full, 1e-3))
    for p_keep in (0.7, 0.3):
        keep = torch.rand(6, 30, generator=torch.Generator().manual_seed(4)) < p_keep
        we, wo = solve_exact(H, B, keep, 1e-3), solve_obs(H, B, keep, 1e-3, block=7)
        assert not wo[~keep].any()
        e_exact, e_obs = quadratic_error(H, B, yy, we), quadratic_error(H, B, yy, wo)
        e_zero = quadratic_error(H, B, yy, torch.zeros_like(we))
        assert e_exact <= e_obs + 1e-9  # exact is optimal for the mask
        assert e_obs <= e_exact + 0.1 * (e_zero - e_exact)  # OBS gets most of the way


def test_quadratic_error_matches_residual():
    X, Y, keep = stats(5)
    W = torch.randn(keep.shape, dtype=torch.float64) * keep
    direct = float(((Y - X @ W.T) ** 2).sum())
    assert quadratic_error(X.T @ X, X.T @ Y, (Y**2).sum(0), W) == pytest.approx(direct)


def test_choose_prefers_exact_when_small_and_obs_when_dense_and_wide():
    assert choose(torch.ones(10, 50, dtype=torch.bool), "auto") == "exact"
    assert choose(torch.ones(512, 4608, dtype=torch.bool), "auto") == "obs"
    assert choose(torch.ones(512, 4608, dtype=torch.bool), "exact") == "exact"
    assert ridge_of(torch.zeros(3, 3), 0.1) == 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=1, padding=1),
        dict(stride=2, padding=0, dilation=2),
        dict(stride=1, padding=1, groups=2),
        dict(stride=1, padding="same", padding_mode="reflect"),
    ],
)
def test_conv_is_a_linear_map_over_unfolded_patches(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    x = torch.randn(2, 4, 7, 7)
    y = conv(x)
    rows = as_rows(conv, x)  # (g, rows, f)
    w = weight_matrix(conv)  # (g, out_g, f)
    b = conv.bias.view(w.shape[0], -1)
    got = rows @ w.transpose(1, 2) + b.unsqueeze(1)
    torch.testing.assert_close(got, out_rows(conv, y), rtol=1e-5, atol=1e-5)


def test_linear_rows():
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 2, 5)
    rows = as_rows(lin, x)
    torch.testing.assert_close(rows @ lin.weight.T + lin.bias, out_rows(lin, lin(x)))


def test_single_layer_reconstruction_is_the_masked_least_squares():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(40, 6)
    y = lin(x).detach().double()
    keep = torch.rand(3, 6) < 0.5
    info = reconstruct_(lin, {"weight": keep}, [x], ridge=1e-9, solver="exact")
    X = torch.cat([x.double(), torch.ones(40, 1, dtype=torch.float64)], 1)
    k = torch.cat([keep, torch.ones(3, 1, dtype=torch.bool)], 1)
    want = brute_force(X, y, k, 1e-9 * float((X.T @ X).diagonal().mean()))
    torch.testing.assert_close(lin.weight.detach().double(), want[:, :6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lin.bias.detach().double(), want[:, 6], rtol=1e-4, atol=1e-5)
    assert not lin.weight[~keep].any()
    assert info[""]["error_after"] <= info[""]["error_before"]


def test_grouped_conv_solved_per_group_equals_exact_and_obs():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    x = torch.randn(8, 4, 6, 6)
    dense = copy.deepcopy(conv)
    keep = torch.rand(conv.weight.shape) < 0.6
    results = {}
    for solver in ("exact", "obs"):
        net = copy.deepcopy(conv)
        info = reconstruct_(net, {"weight": keep}, [x], dense=dense, solver=solver)
        results[solver] = info[""]["error_after"]
        assert info[""]["solver"] == solver
        assert not net.weight[~keep].any()
    assert results["exact"] <= results["obs"] + 1e-9
    assert results["obs"] <= 1.5 * results["exact"] + 1e-6


def trained_lenet300() -> tuple[nn.Module, torch.Tensor]:
    """A LeNet-300-100 fitted for a few steps to a random teacher (structured inputs)."""
    torch.manual_seed(0)
    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10, seed=0)
    teacher = nn.Linear(64, 10)
    x = torch.randn(256, 1, 8, 8)
    y = teacher(x.flatten(1)).argmax(1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x


def test_lenet300_reconstruction_reduces_every_layer_error():
    net, x = trained_lenet300()
    dense = copy.deepcopy(net)
    masks = prune_(copy.deepcopy(net), 0.9)
    info = reconstruct_(net, masks, [(x, torch.zeros(len(x)))])
    assert list(info) == ["classifier.0", "classifier.2", "classifier.4"]
    for layer in info.values():
        assert layer["error_after"] < layer["error_before"]
    with torch.no_grad():
        plain = copy.deepcopy(dense)
        prune_(plain, 0.9)
        err_plain = (plain(x) - dense(x)).pow(2).mean()
        err_rec = (net(x) - dense(x)).pow(2).mean()
    assert err_rec < 0.5 * err_plain
    for name, p in net.named_parameters():
        if name in masks:
            assert not p[~masks[name]].any()


def test_prune_with_reconstruct_equals_prune_then_reconstruct():
    net, x = trained_lenet300()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    masks = prune_(a, 0.8, calibration=[x], reconstruct=True)
    reconstruct_(b, masks, [x])
    assert same(a, snapshot(b))


HEAVY = pytest.mark.heavy  # minutes of CPU: not in the default run (`make test-heavy` runs them)


@pytest.mark.parametrize(
    "name,shape",
    [("lenet5bn", (1, 12, 12)), ("resnet18", (3, 8, 8)),
     pytest.param("vgg16", (3, 32, 32), marks=HEAVY)],
)  # fmt: skip
def test_bn_and_residual_models_run_end_to_end(name, shape):
    net = build_model(name, input_shape=shape, num_classes=10, seed=0)
    x = torch.randn(6, *shape)
    bn_before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    masks = prune_(net, 0.7, calibration=[x], reconstruct=True)
    assert all(not p[~masks[n]].any() for n, p in net.named_parameters() if n in masks)
    assert any(
        not torch.equal(v, bn_before[k]) for k, v in net.state_dict().items() if k in bn_before
    )
    assert torch.isfinite(net(x)).all()


@pytest.mark.parametrize(
    "calibration,match",
    [
        ([], "empty"),
        (None, "None"),
        ([torch.randn(4, 3, 5)], "input shape"),
        ([torch.full((4, 1, 8, 8), float("nan"))], "NaN"),
        ([torch.randn(4, 1, 8, 8), torch.randn(4, 2, 8, 8)], "batch shape"),
        ([torch.zeros(4, 1, 8, 8, dtype=torch.long)], "floating"),
    ],
)
def test_bad_calibration_raises_one_line_and_changes_nothing(calibration, match):
    net, _ = trained_lenet300()
    state = snapshot(net)
    masks = prune_(copy.deepcopy(net), 0.9)
    with pytest.raises(ValueError, match=match) as err:
        reconstruct_(net, masks, calibration)
    assert "\n" not in str(err.value)
    assert same(net, state)
    with pytest.raises(ValueError, match=match):
        prune_(net, 0.9, calibration=calibration, reconstruct=True)
    assert same(net, state)


def test_bad_arguments_raise():
    net, x = trained_lenet300()
    masks = prune_(copy.deepcopy(net), 0.5)
    with pytest.raises(ValueError, match="Invalid ridge"):
        reconstruct_(net, masks, [x], ridge=0)
    with pytest.raises(ValueError, match="Invalid solver"):
        reconstruct_(net, masks, [x], solver="cg")
    with pytest.raises(ValueError, match="not a parameter"):
        reconstruct_(net, {"nope": masks["classifier.0.weight"]}, [x])
    with pytest.raises(ValueError, match="shape"):
        reconstruct_(net, {"classifier.0.weight": torch.ones(2, 2, dtype=torch.bool)}, [x])
    with pytest.raises(ValueError, match="Invalid dense"):
        reconstruct_(net, masks, [x], dense=nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=1, padding=1),
        dict(stride=2, padding=0, dilation=2),
        dict(stride=(2, 1), padding=(1, 2), groups=2),
        dict(stride=1, padding="same", padding_mode="reflect"),
        dict(padding="valid"),
    ],
)
def test_sampled_rows_equal_the_unfolded_rows_they_index(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    x = torch.randn(3, 4, 7, 8)
    full = as_rows(conv, x)
    assert full.shape[1] == 3 * rows_per_sample(conv, x)
    index = torch.randperm(full.shape[1])[:11]
    assert torch.equal(sample_rows(conv, x, index), full[:, index])
    y = conv(x)
    assert torch.equal(sample_out_rows(conv, y, index), out_rows(conv, y)[:, index])
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 2, 5)
    index = torch.tensor([7, 0, 3])
    assert rows_per_sample(lin, x) == 2
    assert torch.equal(sample_rows(lin, x, index), as_rows(lin, x)[:, index])
    assert torch.equal(sample_out_rows(lin, lin(x), index), out_rows(lin, lin(x))[:, index])


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def conv_setup(n: int = 24):
    torch.manual_seed(0)
    net = SmallConvNet()
    x = torch.randn(n, 3, 8, 8) + 0.5  # a non-zero mean makes XᵀX less well conditioned
    masks = prune_(copy.deepcopy(net), 0.8)
    return net, x, masks


def test_float32_block_statistics_agree_with_the_float64_reference(monkeypatch):
    net, x, masks = conv_setup()
    ref, f32 = copy.deepcopy(net), copy.deepcopy(net)
    info_ref = reconstruct_(ref, masks, [x], dense=net, exact_statistics=True, max_rows=None)
    monkeypatch.setattr("sfwprune.prune.reconstruct.BLOCK_ROWS", 50)  # many blocks per chunk
    info = reconstruct_(f32, masks, [x], dense=net, max_rows=None, chunk=7)
    for name, layer in info_ref.items():
        for key in ("error_before", "error_after"):
            assert info[name][key] == pytest.approx(layer[key], rel=1e-5, abs=1e-7)
    for (name, a), b in zip(ref.state_dict().items(), f32.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_row_cap_uses_the_sampled_rows_exactly_and_is_seeded():
    from sfwprune.prune.reconstruct import _row_plan, _statistics

    net, x, masks = conv_setup()
    chunks = list(torch.split(x, 10))
    order = ["conv1", "conv2", "fc"]
    plan, per = _row_plan(net, order, chunks, 100, seed=3)
    assert per == {"conv1": 64, "conv2": 16, "fc": 1}
    assert plan["fc"] == [None] * 3  # 24 rows <= 100: all of them
    for name in ("conv1", "conv2"):
        assert sum(len(i) for i in plan[name]) == 100
    again, _ = _row_plan(net, order, chunks, 100, seed=3)
    other, _ = _row_plan(net, order, chunks, 100, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(plan["conv1"], again["conv1"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plan["conv1"], other["conv1"], strict=True))
    # H and B from the sampled rows equal the brute-force products over the same rows
    conv = net.conv2
    inputs = LayerInputs(net, order, chunks, budget=2**30)
    H, B, yy = _statistics(inputs, 1, net, "conv2", chunks, plan["conv2"], None, exact=True)
    x1 = F.relu(net.conv1(x))
    X, Y = as_rows(conv, x1), out_rows(conv, conv(x1))
    starts = [0, 10 * 16, 20 * 16]
    take = torch.cat([i + s for i, s in zip(plan["conv2"], starts, strict=True)])
    X = torch.cat([X[:, take], torch.ones(2, 100, 1)], 2).double()
    Y = Y[:, take].double()
    torch.testing.assert_close(H, X.transpose(1, 2) @ X)
    torch.testing.assert_close(B, X.transpose(1, 2) @ Y)
    torch.testing.assert_close(yy, Y.pow(2).sum(1))


def test_row_cap_above_the_row_count_changes_nothing_and_a_small_cap_still_helps():
    net, x, masks = conv_setup()
    a, b, c = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(a, masks, [x], dense=net, max_rows=None)
    reconstruct_(b, masks, [x], dense=net, max_rows=24 * 64)
    assert same(a, snapshot(b))
    info = reconstruct_(c, masks, [x], dense=net, max_rows=200)
    assert all(v["error_after"] < v["error_before"] for v in info.values())
    assert not torch.equal(c.conv2.weight, a.conv2.weight)  # 200 of 384 rows: other weights
    with torch.no_grad():
        plain = copy.deepcopy(net)
        prune_(plain, 0.8)
        err_plain = (plain(x) - net(x)).pow(2).mean()
        err_cap = (c(x) - net(x)).pow(2).mean()
    assert err_cap < 0.75 * err_plain


def test_cache_reuses_dense_targets_and_is_replaced_when_dense_changes(monkeypatch):
    import sfwprune.prune.reconstruct as rec

    net, x, masks = conv_setup()
    calls = []
    real = rec._dense_targets
    monkeypatch.setattr(rec, "_dense_targets", lambda *a: calls.append(1) or real(*a))
    cache: dict = {}
    a, b, c = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(a, masks, [x], dense=net, max_rows=300, cache=cache)
    reconstruct_(b, masks, [x], dense=net, max_rows=300, cache=cache)
    reconstruct_(c, masks, [x], dense=net, max_rows=300)
    assert len(calls) == 2 and same(a, snapshot(b)) and same(a, snapshot(c))
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    d, e = copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(d, masks, [x], dense=other, max_rows=300, cache=cache)
    reconstruct_(e, masks, [x], dense=other, max_rows=300)
    assert len(calls) == 4 and same(d, snapshot(e))


def test_dense_targets_over_the_memory_budget_fall_back_to_per_layer_forwards(monkeypatch):
    net, x, masks = conv_setup()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(a, masks, [x], dense=net)
    monkeypatch.setattr("sfwprune.prune.reconstruct.TARGET_CACHE_BYTES", 0)
    reconstruct_(b, masks, [x], dense=net)
    assert same(a, snapshot(b))


def test_bad_statistics_arguments_raise():
    net, x = trained_lenet300()
    masks = prune_(copy.deepcopy(net), 0.5)
    for kwargs, match in [
        (dict(max_rows=0), "Invalid max_rows"),
        (dict(max_rows=2.5), "Invalid max_rows"),
        (dict(seed="a"), "Invalid seed"),
        (dict(cache=[]), "Invalid cache"),
    ]:
        with pytest.raises(ValueError, match=match):
            reconstruct_(net, masks, [x], **kwargs)


@pytest.mark.parametrize(
    "name,shape",
    [pytest.param("resnet18", (3, 8, 8), marks=HEAVY),
     pytest.param("vgg16", (3, 32, 32), marks=HEAVY), ("lenet5bn", (1, 12, 12))],
)  # fmt: skip
def test_cached_layer_inputs_give_the_same_reconstruction_as_full_forwards(
    name, shape, monkeypatch
):
    net = build_model(name, input_shape=shape, num_classes=10, seed=0).eval()
    x = torch.randn(8, *shape)  # chunks of 3, 3, 2: BatchNorm recalibration needs 2 per chunk
    masks = prune_(copy.deepcopy(net), 0.7)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(a, masks, [x], dense=net, chunk=3)
    monkeypatch.setattr("sfwprune.prune.reconstruct.ACTIVATION_CACHE_BYTES", 0)
    reconstruct_(b, masks, [x], dense=net, chunk=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def test_layer_inputs_resume_inside_blocks_and_match_full_forwards():
    from sfwprune.prune.calibration import capture, forward_order

    net = build_model("resnet18", input_shape=(3, 8, 8), num_classes=10, seed=0).eval()
    x = torch.randn(5, 3, 8, 8)
    chunks = [x[:3], x[3:]]
    order = [n for n, _ in forward_order(net, x[:1])]
    inputs = LayerInputs(net, order, chunks, budget=2**30)
    assert all(a is not None and a is not net for a in inputs.anchor[:-1])  # fc: after flatten
    for i, name in enumerate(order):
        for c in range(2):
            want = capture(net, net.get_submodule(name), chunks[c], output=False)[0]
            assert torch.equal(inputs.get(i, c), want)
        inputs.done(i)
    assert not inputs.cache
    none = LayerInputs(net, order, chunks, budget=0)
    assert none.anchor == [None] * len(order)


def test_cache_keeps_the_statistics_of_layers_fed_the_calibration_inputs(monkeypatch):
    # LeNet-300-100's first Linear sees Flatten(x): its H, B (and OBS factors) are the same at
    # every level of a sweep, so a second call with the cache computes only the later layers
    import sfwprune.prune.reconstruct as rec

    net, x = trained_lenet300()
    seen = []
    real = rec._statistics
    monkeypatch.setattr(rec, "_statistics", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    cache: dict = {}
    runs = []
    for level in (0.5, 0.9):
        masks = prune_(copy.deepcopy(net), level)
        a, b = copy.deepcopy(net), copy.deepcopy(net)
        reconstruct_(a, masks, [x], dense=net, cache=cache, solver="obs")
        reconstruct_(b, masks, [x], dense=net, solver="obs")  # no cache: the reference
        assert same(a, snapshot(b))
        runs.append(list(seen))
        seen.clear()
    first = "classifier.0"
    assert runs[0].count(first) == 2 and runs[1].count(first) == 1  # cached the second time
    assert len(cache["stats"][first][1][0]) == 1  # the OBS factors of its one λ


def test_a_layer_after_a_module_with_buffers_is_not_fixed():
    net = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    free = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x = torch.randn(5, 6)
    for model, want in ((net, [False, False]), (free, [True, False])):
        inputs = LayerInputs(model, ["1", "3"], [x], budget=2**30)
        assert [inputs.fixed(0), inputs.fixed(1)] == want


def test_errors_false_gives_the_same_weights_without_the_error_measurements():
    net, x = trained_lenet300()
    masks = prune_(copy.deepcopy(net), 0.8)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    info_a = reconstruct_(a, masks, [x], dense=net)
    info_b = reconstruct_(b, masks, [x], dense=net, errors=False)
    assert same(a, snapshot(b))
    assert {k: {"solver": v["solver"]} for k, v in info_a.items()} == info_b
    with pytest.raises(ValueError, match="Invalid errors"):
        reconstruct_(b, masks, [x], errors=1)


def test_solve_keeps_obs_factors_in_its_memo():
    from sfwprune.prune.solvers import solve

    X, Y, keep = stats(4, rows=80, d=12, out=5)
    H, B = X.T @ X, X.T @ Y
    memo: dict = {}
    want, how = solve(H, B, keep, 1e-3, "obs")
    for _ in range(2):
        got, how_memo = solve(H, B, keep, 1e-3, "obs", memo)
        assert how == how_memo == "obs" and torch.equal(got, want) and len(memo) == 1


class _TailNet(nn.Module):
    """LeNet-5's shape: a block returning its last child's output, then a head fed that output
    (optionally changed in place in between)."""

    def __init__(self, inplace_after: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(2, 3, 3, padding=1), nn.Flatten())  # fmt: skip
        self.head = nn.Sequential(nn.Linear(3 * 5 * 5, 7), nn.ReLU(), nn.Linear(7, 4))
        self.inplace_after = inplace_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.head(y.mul_(2.0) if self.inplace_after else y)


@pytest.mark.parametrize("inplace_after", [False, True])
def test_layer_inputs_build_a_block_output_from_its_tail_only_when_it_is_that_output(
    inplace_after,
):
    from sfwprune.prune.calibration import capture, forward_order

    torch.manual_seed(0)
    net = _TailNet(inplace_after).eval()
    x = torch.randn(6, 1, 5, 5)
    chunks = [x[:4], x[4:]]
    order = [n for n, _ in forward_order(net, x[:1])]
    want = [[capture(net, net.get_submodule(n), ch, output=False)[0].clone() for ch in chunks]
            for n in order]  # fmt: skip
    inputs = LayerInputs(net, order, chunks, budget=2**30)
    assert inputs.tail[net.block] is net.block[3]
    # y.mul_ after the block returned: the head's input has the block output's id, not its value
    assert (net.head in inputs.source) is not inplace_after
    first_conv = []
    net.block[0].register_forward_hook(lambda *a: first_conv.append(1))
    for i, _name in enumerate(order):
        for c in range(2):
            assert torch.equal(inputs.get(i, c), want[i][c])
        inputs.done(i)
    # the second conv's input once per chunk; the head's inputs from the second conv's cached
    # input (tail), else each of its two layers' from a forward of the whole model
    assert len(first_conv) == (6 if inplace_after else 2)


def _inputs_match_full_forwards(net: nn.Module, x: torch.Tensor) -> LayerInputs:
    """Every layer's input from LayerInputs equals a forward cut at the layer, while each
    layer's weights change after it is read (as reconstruction changes them)."""
    from sfwprune.prune.calibration import capture, forward_order

    chunks = [x[:4], x[4:]]
    order = [n for n, _ in forward_order(net, x[:1])]
    inputs = LayerInputs(net, order, chunks, budget=2**30)
    for i, name in enumerate(order):
        for c in range(2):
            want = capture(net, net.get_submodule(name), chunks[c].clone(), output=False)[0]
            assert torch.equal(inputs.get(i, c), want), (name, c)
        with torch.no_grad():
            net.get_submodule(name).weight.mul_(1.5)
        inputs.done(i)
    return inputs


class _TwoConsumers(nn.Module):
    """A block ending in a non-idempotent in-place activation, read by two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))
        self.b1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.b2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.b1(h) + self.b2(h)


class _ClampAfter(nn.Module):
    """Returns its child's output changed in place: on a small probe sample, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x).clamp_(max=1.0)


def test_layer_inputs_copy_cached_inputs_that_a_module_changes_in_place():
    torch.manual_seed(0)
    net = _TwoConsumers().eval()
    inputs = _inputs_match_full_forwards(net, torch.randn(8, 1, 6, 6))
    assert net.stem[1] in inputs.mutates and net.stem[0] not in inputs.mutates


def test_layer_inputs_take_tails_of_plain_sequentials_only():
    torch.manual_seed(0)
    net = nn.Sequential(_ClampAfter(), nn.Linear(2 * 5 * 5, 3)).eval()
    x = torch.randn(8, 1, 5, 5)
    x[0] *= 1e-3  # the probe sample: the clamp changes nothing there, elsewhere it does
    inputs = _inputs_match_full_forwards(net, x)
    assert net[0] not in inputs.tail and net[0].seq in inputs.tail


def test_cache_key_sees_reordered_calibration_inputs():
    net, x = trained_lenet300()
    masks = prune_(copy.deepcopy(net), 0.9)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    cache: dict = {}
    reconstruct_(copy.deepcopy(net), masks, [x], dense=net, cache=cache)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(a, masks, [x[perm]], dense=net, cache=cache)  # same sums, other order
    reconstruct_(b, masks, [x[perm]], dense=net)
    assert same(a, snapshot(b))
