"""Cost of a sparsity sweep: one ranking for all levels vs re-ranking at every level.

Prints JSON. The model is a stack of ``Linear(width, width)`` layers (~10M weights at the
defaults); ``evaluate`` does nothing, so the times are the pruning machinery alone. Variants:

- ``sweep_rank_once``: :func:`sparsity_sweep` (one stable argsort, then a scatter per level).
- ``reprune_select``: restore from one saved copy, then :func:`prune_` per level (a selection,
  ``kthvalue`` + ties, re-done at every level).
- ``resort_each_level``: restore, then a full stable argsort per level.
- ``deepcopy_each_level``: the naive loop, a deep copy of the model per level then ``prune_``.

    python benchmarks/sweep_time.py --threads 1 [--layers 4 --width 1600 --repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sfwprune._io import atomic_write_json
from sfwprune.experiments.provenance import provenance
from sfwprune.prune import Ranking, prune_, sparsity_sweep

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def stack(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def noop(model: nn.Module) -> dict[str, float]:
    return {"accuracy": 0.0, "loss": 0.0}


def sweep_rank_once(model: nn.Module) -> None:
    sparsity_sweep(model, noop, LEVELS)


def _restoring(model: nn.Module, level_fn: Callable[[nn.Module, float], None]) -> None:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for s in LEVELS:
            for w, c in zip(weights, saved, strict=True):
                w.copy_(c)
            level_fn(model, s)
            noop(model)
        for w, c in zip(weights, saved, strict=True):
            w.copy_(c)


def reprune_select(model: nn.Module) -> None:
    _restoring(model, lambda m, s: prune_(m, s))


def _resort_level(model: nn.Module, s: float) -> None:
    ranking = Ranking(model)
    for p, keep in zip(ranking.params, ranking.masks(s).values(), strict=True):
        p.masked_fill_(~keep, 0)


def resort_each_level(model: nn.Module) -> None:
    _restoring(model, _resort_level)


def deepcopy_each_level(model: nn.Module) -> None:
    for s in LEVELS:
        pruned = copy.deepcopy(model)
        prune_(pruned, s)
        noop(pruned)


VARIANTS = {
    "sweep_rank_once": sweep_rank_once,
    "reprune_select": reprune_select,
    "resort_each_level": resort_each_level,
    "deepcopy_each_level": deepcopy_each_level,
}


def component_times(model: nn.Module) -> dict[str, float]:
    """Seconds for one argsort ranking, one level's masks, one selection (``prune_`` inner)."""
    t = time.perf_counter()
    ranking = Ranking(model)
    rank_s = time.perf_counter() - t
    t = time.perf_counter()
    ranking.masks(0.9)
    masks_s = time.perf_counter() - t
    pruned = copy.deepcopy(model)
    t = time.perf_counter()
    prune_(pruned, 0.9)
    prune_s = time.perf_counter() - t
    return {"argsort_ranking_s": rank_s, "masks_from_ranking_s": masks_s, "prune_select_s": prune_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = stack(args.layers, args.width)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    before = [p.detach().clone() for p in model.parameters()]
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):  # interleaved
        for name, fn in VARIANTS.items():
            t = time.perf_counter()
            fn(model)
            times[name].append(time.perf_counter() - t)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "sweep_time",
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "ranked_weights": weights,
        "levels": list(LEVELS),
        "median_s": med,
        "all_s": times,
        "per_level_s": {k: v / len(LEVELS) for k, v in med.items()},
        "speedup_vs_sweep": {k: v / med["sweep_rank_once"] for k, v in med.items()},
        "components": component_times(model),
        "model_unchanged": unchanged,
    }
    result.update(provenance("cpu", time.perf_counter() - start))
    print(json.dumps(result, indent=2))
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
