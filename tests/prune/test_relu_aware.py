"""ReLU-aware reconstruction: which layers qualify, the re-solves against a plain reference loop,
the kept-rows fast path against the pass per re-solve, the solvers' factor memos, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfwprune.prune import prune_, reconstruct_, sparsity_sweep
from sfwprune.prune import reconstruct as rec
from sfwprune.prune.reconstruct import relu_fed
from sfwprune.prune.solvers import ridge_of, solve


class _Block(nn.Sequential):
    """A Sequential subclass: it may use its children otherwise, so nothing in it qualifies."""


class _Leaky(nn.ReLU):
    """Not a ReLU's forward: a subclass does not qualify."""

    def forward(self, x):
        return torch.tanh(x)


class _ByHand(nn.Module):
    """Calls its Sequential's children one by one and reads the pre-ReLU output twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.body[0](x)
        return self.head(y + self.body[1](y))


def test_relu_fed_layers_are_those_a_plain_sequential_passes_straight_to_a_relu():
    net = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Sequential(nn.Linear(5, 3), nn.ReLU(inplace=True)), _Block(nn.Linear(3, 3), nn.ReLU()),
        nn.Sequential(nn.Linear(3, 3), _Leaky()), nn.Linear(3, 2),
    ).eval()  # fmt: skip
    x = torch.randn(2, 4)
    order = ["0", "2", "5.0", "6.0", "7.0", "8"]
    assert relu_fed(net, order, x) == {"0", "5.0"}
    assert relu_fed(net, ["2", "8"], x) == set()
    assert relu_fed(_ByHand(), ["body.0", "head"], x) == set()  # body never runs as a whole


def _lstsq(X, Y, keep, lam):
    """Per unit: lstsq of [X_S; √λ I] w = [y; 0] (the ridge objective, no normal equations)."""
    W = torch.zeros(keep.shape, dtype=X.dtype)
    for r in range(keep.shape[0]):
        S = keep[r].nonzero().squeeze(1)
        A = torch.cat([X[:, S], lam**0.5 * torch.eye(len(S), dtype=X.dtype)])
        b = torch.cat([Y[:, r], torch.zeros(len(S), dtype=X.dtype)])
        W[r, S] = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return W


def _one_layer(seed: int = 0) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 6), nn.ReLU()).double()
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    masks = prune_(copy.deepcopy(net), 0.7)
    return net, x, masks


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_aware_re_solves_equal_a_plain_reference_loop(seed):
    net, x, masks = _one_layer(seed)
    layer = net[0]
    Xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    Y = layer(x).detach()
    keep = torch.cat([masks["0.weight"], torch.ones(6, 1, dtype=torch.bool)], 1)
    lam = ridge_of(Xa.T @ Xa, 1e-3)
    W = _lstsq(Xa, Y, keep, lam)  # the plain reconstruction
    for _ in range(rec.RELU_STEPS):  # each step: targets y where y > 0, else min(prediction, 0)
        P = Xa @ W.T
        W = _lstsq(Xa, torch.where(Y > 0, Y, P.clamp(max=0)), keep, lam)
    got = copy.deepcopy(net)
    reconstruct_(got, masks, [x], exact_statistics=True, max_rows=None, relu_aware=True)
    torch.testing.assert_close(got[0].weight, W[:, :12], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got[0].bias, W[:, 12], rtol=1e-7, atol=1e-9)
    plain = copy.deepcopy(net)
    reconstruct_(plain, masks, [x], exact_statistics=True, max_rows=None)

    @torch.no_grad()
    def relu_error(m):  # what the ReLU passes on, against the dense network's
        return float((m(x) - net(x)).pow(2).sum())

    assert relu_error(got) < relu_error(plain)


def test_layers_not_feeding_a_relu_are_solved_as_without_relu_aware():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(200, 8, generator=g)
    masks = prune_(copy.deepcopy(net), 0.6)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    info_a = reconstruct_(a, masks, [x], relu_aware=True)
    info_b = reconstruct_(b, masks, [x])
    assert info_a == info_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_layer_not_feeding_a_relu_is_solved_plainly_on_its_actual_inputs():
    g = torch.Generator().manual_seed(8)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2))
    net = net.double()
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    masks = prune_(copy.deepcopy(net), 0.7)
    got = copy.deepcopy(net)
    reconstruct_(got, masks, [x], exact_statistics=True, max_rows=None, relu_aware=True)
    plain = copy.deepcopy(net)
    reconstruct_(plain, masks, [x], exact_statistics=True, max_rows=None)
    assert not torch.equal(got[0].weight, plain[0].weight)  # layer 0 feeds a ReLU
    with torch.no_grad():  # layer 2: the least squares on the inputs layer 0 now gives it
        X = got[1](got[0](x))
        Y = net[2](net[1](net[0](x)))
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    keep = torch.cat([masks["2.weight"], torch.ones(5, 1, dtype=torch.bool)], 1)
    W = _lstsq(Xa, Y, keep, ridge_of(Xa.T @ Xa, 1e-3))
    torch.testing.assert_close(got[2].weight, W[:, :8], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got[2].bias, W[:, 8], rtol=1e-7, atol=1e-9)


def test_a_sweep_keeps_the_rows_of_a_relu_fed_first_layer(monkeypatch):
    g = torch.Generator().manual_seed(9)
    net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(128, 8, generator=g)
    seen: list[str] = []
    real = rec._statistics
    monkeypatch.setattr(rec, "_statistics", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    kwargs = {"calibration": [x], "reconstruct": True, "relu_aware": True}
    rows = sparsity_sweep(net, lambda m: {"accuracy": 0.0, "loss": 0.0}, [0.5, 0.8, 0.9], **kwargs)
    assert len(rows) == 3
    # layer "0" (fed the calibration inputs): statistics and rows once, no pass per re-solve
    assert seen.count("0") == 1 and seen.count("2") == 3


def test_kept_rows_and_a_pass_per_re_solve_give_the_same_weights(monkeypatch):
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(),
        nn.Linear(5, 3),
    )  # fmt: skip
    x = torch.randn(40, 2, 8, 8, generator=g)
    masks = prune_(copy.deepcopy(net), 0.8)
    kept, passes = copy.deepcopy(net), copy.deepcopy(net)
    reconstruct_(kept, masks, [x], chunk=16, relu_aware=True)
    monkeypatch.setattr(rec, "RELU_ROWS_BYTES", 0)  # nothing kept: one pass per re-solve
    reconstruct_(passes, masks, [x], chunk=16, relu_aware=True)
    for p, q in zip(kept.parameters(), passes.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    plain = copy.deepcopy(net)
    reconstruct_(plain, masks, [x], chunk=16)
    assert not torch.equal(plain[0].weight, kept[0].weight)  # the re-solves did something
    assert torch.equal(kept[0].weight == 0, plain[0].weight == 0)  # and kept the masks


def test_solver_memos_reuse_factors_for_a_new_right_hand_side_only():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(80, 10, generator=g, dtype=torch.float64)
    Y1, Y2 = torch.randn(2, 80, 4, generator=g, dtype=torch.float64)
    H = X.T @ X
    keep = torch.rand(4, 10, generator=g) < 0.5
    other = ~keep
    for name in ("exact", "obs"):
        memo: dict = {}
        for B, k in ((X.T @ Y1, keep), (X.T @ Y2, keep), (X.T @ Y2, other), (X.T @ Y1, keep)):
            got, how = solve(H, B, k, 1e-3, name, memo)
            want, _ = solve(H, B, k, 1e-3, name)
            assert how == name and torch.equal(got, want)
        assert len(memo) == 1


def test_exact_factors_over_the_memo_budget_are_not_kept(monkeypatch):
    from sfwprune.prune import solvers

    g = torch.Generator().manual_seed(7)
    X = torch.randn(60, 8, generator=g, dtype=torch.float64)
    H, B = X.T @ X, X.T @ torch.randn(60, 3, generator=g, dtype=torch.float64)
    keep = torch.rand(3, 8, generator=g) < 0.6
    memo: dict = {}
    want, _ = solve(H, B, keep, 1e-3, "exact", memo)
    assert "exact" in memo
    monkeypatch.setattr(solvers, "MEMO_ELEMENTS", 0)
    got, _ = solve(H, 2 * B, ~keep, 1e-3, "exact", memo)  # a new mask: the old entry goes too
    assert memo == {} and torch.equal(got, solve(H, 2 * B, ~keep, 1e-3, "exact")[0])


def test_sweep_with_relu_aware_leaves_the_model_bit_identical_and_differs_from_plain():
    g = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(128, 8, generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def evaluate(m):
        return {"accuracy": 0.0, "loss": float((m(x) - net_dense(x)).pow(2).mean())}

    net_dense = copy.deepcopy(net)
    kwargs = {"calibration": [x], "reconstruct": True, "gradual": True}
    relu = sparsity_sweep(net, evaluate, [0.5, 0.9], relu_aware=True, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    plain = sparsity_sweep(net, evaluate, [0.5, 0.9], **kwargs)
    assert [r["loss"] for r in relu] != [r["loss"] for r in plain]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda net, x: prune_(net, 0.5, relu_aware=True), "needs reconstruct=True"),
        (lambda net, x: prune_(net, 0.5, calibration=[x], reconstruct=True, relu_aware=1),
         "Invalid relu_aware: 1"),
        (lambda net, x: reconstruct_(net, {}, [x], relu_aware="yes"), "Invalid relu_aware: 'yes'"),
        (lambda net, x: sparsity_sweep(net, lambda m: {}, [0.5], relu_aware=True),
         "needs reconstruct=True"),
    ],
)  # fmt: skip
def test_bad_relu_aware_raises_and_changes_nothing(call, match):
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(net, torch.randn(8, 4))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
