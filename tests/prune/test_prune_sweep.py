"""sparsity_sweep: one ranking, levels equal prune_, the model bit-identical afterwards."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sfwprune.prune.sweep as sweep_module
from sfwprune.prune import prune_, recalibrate_bn, reconstruct_, sparsity_sweep


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"b:{n}": b.clone() for n, b in model.named_buffers()})
    return state


def assert_bit_identical(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def data(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def evaluate_on(x, y):
    def evaluate(model):
        model.eval()
        with torch.no_grad():
            out = model(x)
        return {
            "accuracy": (out.argmax(1) == y).float().mean().item(),
            "loss": F.cross_entropy(out, y).item(),
            "n": len(y),
        }

    return evaluate


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sweep_restores_model_bit_identically(make_convbn, scope):
    model = make_convbn()
    model.train()  # evaluate switches to eval; the flag must come back
    x, y = data()
    batches = [data(s)[0] for s in (1, 2)]
    state = snapshot(model)
    rows = sparsity_sweep(
        model, evaluate_on(x, y), [0.5, 0.9, 0.0, 1.0], bn_batches=batches, scope=scope
    )
    assert len(rows) == 4
    assert_bit_identical(model, state)
    assert all(m.training for m in model.modules())


def test_each_level_equals_prune_then_recalibrate(make_convbn):
    model = make_convbn()
    x, y = data()
    batches = [data(s)[0] for s in (1, 2)]
    seen = []

    def evaluate(m):
        seen.append(snapshot(m))
        return evaluate_on(x, y)(m)

    levels = [0.3, 0.8, 0.95]
    rows = sparsity_sweep(model, evaluate, levels, bn_batches=batches)
    for level, state, row in zip(levels, seen, rows, strict=True):
        ref = make_convbn()
        prune_(ref, level)
        recalibrate_bn(ref, batches)
        assert_bit_identical(ref, state)
        want = evaluate_on(x, y)(ref)
        assert row["accuracy"] == want["accuracy"] and row["loss"] == want["loss"]


def test_rows_have_targets_measured_sparsity_and_extra_keys(lenet300):
    n = sum(m.weight.numel() for m in lenet300.modules() if isinstance(m, nn.Linear))

    def evaluate(model):
        return {"loss": torch.tensor(0.25), "accuracy": 0.5, "top5": 0.9, "sparsity": "ignored"}

    levels = [0.0, 0.5, 0.9, 0.99]
    rows = sparsity_sweep(lenet300, evaluate, levels)
    assert [r["sparsity"] for r in rows] == levels
    for r in rows:
        assert list(r)[:4] == ["sparsity", "measured_sparsity", "accuracy", "loss"]
        assert abs(r["measured_sparsity"] - r["sparsity"]) <= 1 / n
        assert r["loss"] == 0.25 and isinstance(r["loss"], float) and r["top5"] == 0.9


def test_ranks_once_for_all_levels(monkeypatch, lenet300):
    calls = []
    real = sweep_module.flat_scores

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "flat_scores", counting)
    sparsity_sweep(lenet300, lambda m: {"accuracy": 0, "loss": 0}, [0.1, 0.5, 0.9, 0.99])
    assert len(calls) == 1


def test_seeded_random_sweep_levels_are_nested_and_match_prune(make_lenet300):
    masks = []

    def evaluate(model):
        masks.append([m.weight != 0 for m in model.modules() if isinstance(m, nn.Linear)])
        return {"accuracy": 0.0, "loss": 0.0}

    gen = torch.Generator().manual_seed(7)
    sparsity_sweep(make_lenet300(), evaluate, [0.5, 0.9], criterion="random", generator=gen)
    low, high = masks
    assert all((h <= lo).all() for lo, h in zip(low, high, strict=True))  # kept at 0.9 ⊂ at 0.5
    gen = torch.Generator().manual_seed(7)
    ref = prune_(make_lenet300(), 0.9, criterion="random", generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(ref.values(), high, strict=True))


def test_model_restored_when_evaluate_raises(convbn):
    state = snapshot(convbn)

    def evaluate(model):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sparsity_sweep(convbn, evaluate, [0.9], bn_batches=[data()[0]])
    assert_bit_identical(convbn, state)


def test_one_shot_iterator_of_bn_batches_serves_every_level(convbn):
    x, y = data()
    rows = sparsity_sweep(
        convbn, evaluate_on(x, y), [0.5, 0.9], bn_batches=iter([data(1)[0], data(2)[0]])
    )
    assert len(rows) == 2


def test_bad_arguments_raise_before_touching_the_model(lenet300):
    state = snapshot(lenet300)
    ok = lambda m: {"accuracy": 1.0, "loss": 0.0}  # noqa: E731
    with pytest.raises(ValueError, match=re.escape("Invalid sparsity: 1.01")):
        sparsity_sweep(lenet300, ok, [0.5, 1.01])
    with pytest.raises(ValueError, match=re.escape("Invalid scope: 'net'")):
        sparsity_sweep(lenet300, ok, [0.5], scope="net")
    with pytest.raises(ValueError, match="Invalid prune_kwargs"):
        sparsity_sweep(lenet300, ok, [0.5], sparsity=0.5)
    with pytest.raises(ValueError, match="missing \\['loss'\\]"):
        sparsity_sweep(lenet300, lambda m: {"accuracy": 1.0}, [0.5])
    assert_bit_identical(lenet300, state)


def _recording_sweep_setup(make_convbn):
    """A ConvBN model in train mode, calibration batches, its snapshot, and an ``evaluate`` that
    records a snapshot of every level it sees (in ``seen``)."""
    model = make_convbn()
    model.train()
    x, y = data()
    calibration = [(data(s)[0], torch.zeros(16)) for s in (1, 2)]
    seen = []

    def evaluate(m):
        seen.append(snapshot(m))
        return evaluate_on(x, y)(m)

    return model, calibration, snapshot(model), seen, evaluate


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_reconstructed_sweep_equals_prune_with_reconstruct_and_restores_the_model(
    make_convbn, criterion
):
    model, calibration, state, seen, evaluate = _recording_sweep_setup(make_convbn)

    levels = [0.5, 0.9]
    rows = sparsity_sweep(
        model, evaluate, levels, calibration=calibration, reconstruct=True, criterion=criterion
    )
    assert_bit_identical(model, state)
    assert all(m.training for m in model.modules())
    for level, got, row in zip(levels, seen, rows, strict=True):
        ref = make_convbn()
        prune_(ref, level, criterion=criterion, calibration=calibration, reconstruct=True)
        assert_bit_identical(ref, got)
        assert row["seconds"] > 0 and list(row)[4] == "seconds"


def test_reconstructed_sweep_errors_change_nothing(lenet300):
    state = snapshot(lenet300)
    ok = lambda m: {"accuracy": 1.0, "loss": 0.0}  # noqa: E731
    for calibration, match in [([], "empty"), (None, "None"), ([torch.randn(2, 5)], "shape")]:
        with pytest.raises(ValueError, match=match):
            sparsity_sweep(lenet300, ok, [0.5], calibration=calibration, reconstruct=True)
    assert_bit_identical(lenet300, state)


def test_gradual_sweep_prunes_on_from_the_previous_reconstructed_level(make_convbn):
    model, calibration, state, seen, evaluate = _recording_sweep_setup(make_convbn)

    # given out of order: run in increasing order, rows returned in the order given
    rows = sparsity_sweep(
        model, evaluate, [0.9, 0.5], calibration=calibration, reconstruct=True, gradual=True,
        gradual_step=1.0,
    )  # fmt: skip
    assert [r["sparsity"] for r in rows] == [0.9, 0.5]
    assert [r["steps"] for r in rows] == [1, 1]
    assert_bit_identical(model, state)
    assert all(m.training for m in model.modules())
    # first level: plain prune_ + reconstruction
    ref = make_convbn()
    first = prune_(ref, 0.5, calibration=calibration, reconstruct=True)
    assert_bit_identical(ref, seen[0])
    # second: rank the reconstructed weights (pruned ones first), reconstruct against the dense net
    second = prune_(copy.deepcopy(ref), 0.9)
    for name, keep in second.items():
        assert not (keep & ~first[name]).any(), name  # nested
    reconstruct_(ref, second, calibration, dense=make_convbn())
    assert_bit_identical(ref, seen[1])
    # not what the plain sweep gives at 0.9
    plain = make_convbn()
    prune_(plain, 0.9, calibration=calibration, reconstruct=True)
    assert any(not torch.equal(v, seen[1][k]) for k, v in snapshot(plain).items())


def test_gradual_steps_between_levels_equal_a_hand_built_chain(make_convbn):
    model, calibration, state, seen, evaluate = _recording_sweep_setup(make_convbn)
    rows = sparsity_sweep(
        model, evaluate, [0.9, 0.5], calibration=calibration, reconstruct=True, gradual=True,
        gradual_step=0.5,
    )  # fmt: skip
    assert_bit_identical(model, state)
    plan = sweep_module.gradual_schedule([0.9, 0.5], 0.5)
    # kept fractions 1 -> 0.5 (level 0.5), then 0.5 -> 0.1 in three steps of <= half each
    assert [i for _, i in plan] == [1, None, None, 0]
    assert [r["steps"] for r in rows] == [3, 1] and len(seen) == 2
    ref, dense, masks = make_convbn(), make_convbn(), None
    chain = []
    for sparsity, index in plan:
        if masks is not None:  # rank the reconstructed weights, the pruned ones first
            ranking = sweep_module.Ranking(ref, calibration=calibration, keep=masks)
            masks = ranking.masks(sparsity)
            with torch.no_grad():
                for p, keep in zip(ranking.params, masks.values(), strict=True):
                    p.masked_fill_(~keep, 0)
            reconstruct_(ref, masks, calibration, dense=dense)
        else:
            masks = prune_(ref, sparsity, calibration=calibration, reconstruct=True)
        if index is not None:
            chain.append(snapshot(ref))
    for got, want in zip(seen, chain, strict=True):
        for k, v in want.items():
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_gradual_prune_is_the_single_level_gradual_sweep(make_convbn, criterion):
    model, calibration, _, seen, evaluate = _recording_sweep_setup(make_convbn)
    rows = sparsity_sweep(
        model, evaluate, [0.9], calibration=calibration, reconstruct=True, gradual=True,
        gradual_step=0.4, criterion=criterion,
    )  # fmt: skip
    assert rows[0]["steps"] == 5  # kept 1 -> 0.1 by factors >= 0.6 (0.6**4 > 0.1): five steps
    ref = make_convbn()
    ref.train()
    masks = sweep_module.gradual_prune_(
        ref, 0.9, calibration, gradual_step=0.4, criterion=criterion
    )
    assert_bit_identical(ref, seen[0])
    for name, p in ref.named_parameters():
        if name in masks:
            assert not p[~masks[name]].any(), name


def test_gradual_prune_refuses_bad_input_and_changes_nothing(lenet300):
    state = snapshot(lenet300)
    calibration = [torch.randn(4, 1, 28, 28)]
    for kwargs, match in [
        ({"gradual_step": 0.0}, "Invalid gradual_step"),
        ({"criterion": "random"}, "Invalid criterion"),
        ({"scope": "row"}, "Invalid scope"),
    ]:
        with pytest.raises(ValueError, match=match):
            sweep_module.gradual_prune_(lenet300, 0.5, calibration, **kwargs)
    for calibration, match in [([], "empty"), ([torch.randn(2, 5)], "shape")]:
        with pytest.raises(ValueError, match=match):
            sweep_module.gradual_prune_(lenet300, 0.5, calibration)
    with pytest.raises(ValueError, match="Invalid sparsity"):
        sweep_module.gradual_prune_(lenet300, 1.5, [torch.randn(4, 1, 28, 28)])
    assert_bit_identical(lenet300, state)


@pytest.mark.parametrize("step", [0.1, 0.25, 0.5, 0.9])
def test_gradual_schedule_bounds_every_step(step):
    levels = [0.99, 0.0, 0.5, 0.9, 0.95, 0.98]
    plan = sweep_module.gradual_schedule(levels, step)
    sparsities = [s for s, _ in plan]
    assert sparsities == sorted(sparsities)
    assert [levels[i] for _, i in plan if i is not None] == sorted(levels)
    kept = [1.0] + [1.0 - s for s in sparsities]
    for before, after in zip(kept, kept[1:]):
        assert after >= before * (1.0 - step) - 1e-12  # no step prunes more than `step`
    # the fewest steps that can: one fewer would break the bound somewhere
    for lo, hi in zip([0.0, *sorted(levels)], sorted(levels)):
        n = sum(1 for s, _ in plan if lo < s <= hi)
        if hi > lo:
            assert (1 - hi) / (1 - lo) < (1 - step) ** (n - 1) + 1e-12


def test_gradual_schedule_step_one_is_the_levels_alone():
    assert sweep_module.gradual_schedule([0.9, 0.5, 1.0], 1.0) == [(0.5, 1), (0.9, 0), (1.0, 2)]


def test_gradual_keeps_pruned_entries_pruned_even_if_kept_weights_are_zero(lenet300):
    named = [(n, p) for n, p in lenet300.named_parameters() if p.dim() > 1]
    keep = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.3
            for n, p in named}  # fmt: skip
    with torch.no_grad():
        for n, p in named:
            p[~keep[n]] = 0.5  # large weights, yet pruned before
            p[keep[n] & (torch.arange(p.numel()).view(p.shape) % 7 == 0)] = 0.0  # kept zeros
    ranking = sweep_module.Ranking(lenet300, keep=keep)
    pruned_before = sum(int((~k).sum()) for k in keep.values())
    n = sum(p.numel() for _, p in named)
    masks = ranking.masks(pruned_before / n + 0.01)
    for name, k in keep.items():
        assert not (masks[name] & ~k).any()


def test_gradual_needs_unstructured_reconstruction(lenet300):
    ok = lambda m: {"accuracy": 1.0, "loss": 0.0}  # noqa: E731
    calibration = [torch.randn(4, 1, 28, 28)]
    with pytest.raises(ValueError, match="Invalid gradual"):
        sparsity_sweep(lenet300, ok, [0.5], gradual=True)
    with pytest.raises(ValueError, match="Invalid gradual"):
        sparsity_sweep(
            lenet300, ok, [0.5], calibration=calibration, reconstruct=True, gradual=True,
            structure="channel",
        )  # fmt: skip
    with pytest.raises(ValueError, match="Invalid gradual"):
        sparsity_sweep(lenet300, ok, [0.5], calibration=calibration, reconstruct=True, gradual=1)
    for step in (0, 1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="Invalid gradual_step"):
            sparsity_sweep(
                lenet300, ok, [0.5], calibration=calibration, reconstruct=True, gradual=True,
                gradual_step=step,
            )  # fmt: skip
