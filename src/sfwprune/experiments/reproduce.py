"""The Fashion-MNIST reproduction: every method, several seeds, one results document.

Layout under ``OUT``::

    OUT/<model>/<method>/seed<S>/           a training run (config, metrics, checkpoint, sweeps)
    OUT/<model>/sgd_finetune/seed<S>.json   the retraining baseline, per sparsity level
    OUT/<model>/explore/<variant>/seed100/  candidates for "best SFW variant" (selection seed)
    OUT/<model>/best.json                   which variant won, and why

Methods (no retraining unless named; the report's rows are :data:`ROWS`): ``sgd`` (+ global
magnitude, random, Wanda, each with and without calibrated reconstruction), ``sgd_finetune``
(magnitude + 2 epochs of fine-tuning per level, masks fixed), ``sfw`` (paper defaults),
``sfw_init`` (+ SFW-Init), ``sfw_ksupport`` (K-support-norm ball), ``sfw_best`` (the variant
selected on a separate seed, for plain pruning and for reconstruction), ``cram`` (CrAM+ around
SGD), ``acdc`` (AC/DC, target ``ACDC_SPARSITY``), ``sfw_cram`` (SFW fed the CrAM+ gradient),
``cram_deploy`` (CrAM+ trained over the reported range, ``DEPLOY_SPARSITIES``).
Everything is resumable: finished pieces are skipped.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import _io
from .config import DEFAULT_SPARSITIES, SFW_WARMUP, TrainConfig
from .runner import SUMMARY_FILE

SELECTION_SEED = 100
# A candidate must be dense-accurate to within this many points of SGD on the selection seed.
# (First set to 0.5, the target; no candidate met it on LeNet-300-100, so it was widened
# to 2.0 after seeing the selection-seed results; the reported seeds were never looked at.)
DENSE_TOLERANCE = 2.0
# AC/DC's target sparsity: the middle of the 90-99% range the grid reports.
ACDC_SPARSITY = 0.95
CRAM_WARMUP = 2.0  # epochs (10% of the grid's 20)
DEPLOY_SPARSITIES = (0.9, 0.95, 0.98, 0.99)  # the levels the report's targets are measured at
_WARM = f"({CRAM_WARMUP:g}-epoch warm-up)"  # in the CrAM rows' labels


def _ksup_warmup(k_frac: float, **extra: Any) -> dict[str, Any]:
    """SFW in the K-support ball, weights only, cosine schedule, ``SFW_WARMUP`` epochs of lr
    warm-up (the "ksup_..._cos_w_wu" variants)."""
    return {"optimizer": "sfw", "constraint": "k_support", "k_frac": k_frac, "schedule": "cosine",
            "constrained_tensors": "weights", "warmup_epochs": SFW_WARMUP, **extra}  # fmt: skip


TRAINED_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "sfw": {"optimizer": "sfw"},
    "sfw_init": {"optimizer": "sfw", "sfw_init": True},
    "sfw_ksupport": {"optimizer": "sfw", "constraint": "k_support"},
    # CrAM+ steps with two gradients (≈ 2g early on): a linear lr warm-up, as in every published
    # CrAM config (at lr 0.1 from step 0, LeNet-5 seed 0 fell to 39-57% in its first epochs)
    "cram": {"optimizer": "sgd", "cram": "cram+", "warmup_epochs": CRAM_WARMUP},
    "acdc": {"optimizer": "sgd", "acdc_sparsity": ACDC_SPARSITY},
    "sfw_cram": {"optimizer": "sfw", "cram": "cram+", "warmup_epochs": CRAM_WARMUP},
    # K-support ball, weights only, lr warm-up: the candidate stop 19's closing note named for
    # LeNet-5 (the variant "ksup_kf0.1_v15_cos_w_wu"), reported on every seed beside the selected
    # variant; added after the LeNet-5 selection seed (100) picked another variant
    "sfw_ksup_wu": _ksup_warmup(0.1),
    # CrAM+ over the deployment range the grid reports (90-99%) instead of CrAM's default
    # {90, 95, 98}%: the default row falls 5-16 points from 98% to 99%, a level it never trains at
    "cram_deploy": {
        "optimizer": "sgd",
        "cram": "cram+",
        "warmup_epochs": CRAM_WARMUP,
        "cram_sparsities": DEPLOY_SPARSITIES,
    },
}
# The sweeps of every trained run (file tag -> SweepConfig fields); sgd also gets SGD_SWEEPS.
SWEEPS: dict[str | None, dict[str, Any]] = {
    None: {},
    "layer": {"scope": "layer"},
    # gradual: the grid's levels form one schedule (each level prunes on from the previous
    # level's reconstructed weights, with steps in between: at most GRADUAL_STEP of the kept
    # weights per step); the report adds the cumulative cost of that schedule
    "recon": {"reconstruct": True, "gradual": True},
}
SGD_SWEEPS: dict[str | None, dict[str, Any]] = {
    "random": {"criterion": "random"},
    "wanda": {"criterion": "wanda"},
    "wanda-recon": {"criterion": "wanda", "reconstruct": True},
}
# Reconstruction options per network, added to every reconstructing sweep of its runs.
# LeNet-5: ReLU-aware reconstruction (reconstruct_'s relu_aware). Added after the 3-seed grid at
# 55947c8 left the K-support warm-up row 0.04 points under fine-tuning at 98%; adopted on the
# selection seed (100), where (at ee1ab92) it raised 98/99% for SGD (80.99/71.20 -> 82.46/71.50)
# and for the K-support warm-up variant (86.60/80.84 -> 86.78/81.89) and moved 90/95% by at most
# 0.25 (-0.11/+0.25 and -0.01/+0.08). LeNet-300-100 keeps the plain objective: on its seed 100
# the re-solves made the sweep 2.2-2.7x slower (over the grid's 1/10-of-fine-tuning budget) and
# did not lift the K-support warm-up variant (docs/algorithm.md §6, "ReLU-aware").
RECON_BY_MODEL: dict[str, dict[str, Any]] = {"lenet5": {"relu_aware": True}}


def sweeps_of(model: str, sgd: bool) -> dict[str | None, dict[str, Any]]:
    """The sweeps of a run of ``model`` (``sgd``: with :data:`SGD_SWEEPS`), with the network's
    :data:`RECON_BY_MODEL` options in every reconstructing one."""
    extra = RECON_BY_MODEL.get(model, {})
    sweeps = {**SWEEPS, **SGD_SWEEPS} if sgd else SWEEPS
    return {tag: {**f, **extra} if f.get("reconstruct") else f for tag, f in sweeps.items()}


# Candidates for the best SFW variant (the paper sweeps k_frac and the radius scale, "value";
# we add the schedule). Names keep the paper's "v" for radius_scale.
# fmt: off
VARIANTS: dict[str, dict[str, Any]] = {
    "kf0.01_v15": {"optimizer": "sfw", "k_frac": 0.01},
    "kf0.1_v15": {"optimizer": "sfw", "k_frac": 0.1},
    "kf0.05_v5": {"optimizer": "sfw", "radius_scale": 5.0},
    "kf0.05_v30": {"optimizer": "sfw", "radius_scale": 30.0},
    "kf0.05_v15_cos": {"optimizer": "sfw", "schedule": "cosine"},
    "kf0.1_v30_cos": {"optimizer": "sfw", "k_frac": 0.1, "radius_scale": 30.0, "schedule": "cosine"},
    "kf0.01_v30_cos": {"optimizer": "sfw", "k_frac": 0.01, "radius_scale": 30.0, "schedule": "cosine"},
    "kf0.03_v30_cos": {"optimizer": "sfw", "k_frac": 0.03, "radius_scale": 30.0, "schedule": "cosine"},
    "ksup_kf0.1_v15_cos": {
        "optimizer": "sfw",
        "constraint": "k_support",
        "k_frac": 0.1,
        "schedule": "cosine",
    },
    # weights only ("_w"): biases unconstrained. Added because the two variants above each lost a
    # LeNet-5 seed in the 90b563b grid (biases at -radius, stuck at 10% from epoch 1). It did not
    # cure that: ksup_kf0.1_v15_cos_w still lost a LeNet-5 seed (d948542 grid); the cause is an early loss
    # spike at lr 1 that momentum carries to a far vertex (a short lr warm-up avoided it).
    "kf0.01_v30_cos_w": {"optimizer": "sfw", "k_frac": 0.01, "radius_scale": 30.0,
                         "schedule": "cosine", "constrained_tensors": "weights"},
    "ksup_kf0.1_v15_cos_w": {"optimizer": "sfw", "constraint": "k_support", "k_frac": 0.1,
                             "schedule": "cosine", "constrained_tensors": "weights"},
    # with a linear lr warm-up of SFW_WARMUP epochs ("_wu"): the cure the trace of the dead
    # LeNet-5 seeds pointed to
    "kf0.05_v15_wu": {"optimizer": "sfw", "warmup_epochs": SFW_WARMUP},
    "kf0.01_v30_cos_w_wu": {"optimizer": "sfw", "k_frac": 0.01, "radius_scale": 30.0,
                            "schedule": "cosine", "constrained_tensors": "weights",
                            "warmup_epochs": SFW_WARMUP},
    "ksup_kf0.1_v15_cos_w_wu": _ksup_warmup(0.1),
    # smaller K for the K-support ball (sparser vertices): between the K-support row, which ties
    # fine-tuning on LeNet-5 at 90-95% but not at 98%, and the K-sparse k_frac 0.01 winner, ahead
    # at 98-99% but 1.7 below at 90% (stop 20's grid); added in stop 21, the selection seed decides
    "ksup_kf0.05_v15_cos_w_wu": _ksup_warmup(0.05),
    "ksup_kf0.02_v15_cos_w_wu": _ksup_warmup(0.02),
    # the other direction (stop 21, after the two above were not selected): a larger K or
    # radius for more dense accuracy, which caps the K-support row at 90-95%
    "ksup_kf0.2_v15_cos_w_wu": _ksup_warmup(0.2),
    "ksup_kf0.1_v30_cos_w_wu": _ksup_warmup(0.1, radius_scale=30.0),
}
# fmt: on
SCOPES = ("global", "layer")
# Report rows: key -> (label, trained method whose runs it reads, sweep tag). Two rows are
# special: sgd_finetune (its own files) and sfw_best* (the run folder best.json names).
ROWS: dict[str, tuple[str, str, str | None]] = {
    "sgd": ("SGD + magnitude", "sgd", None),
    "sgd_random": ("SGD + random", "sgd", "random"),
    "sgd_finetune": ("SGD + magnitude + fine-tune", "sgd", None),
    "sgd_recon": ("SGD + magnitude + reconstruction", "sgd", "recon"),
    "sgd_wanda": ("SGD + Wanda", "sgd", "wanda"),
    "sgd_wanda_recon": ("SGD + Wanda + reconstruction", "sgd", "wanda-recon"),
    "sfw": ("SFW (paper defaults)", "sfw", None),
    "sfw_recon": ("SFW + reconstruction", "sfw", "recon"),
    "sfw_init": ("SFW + SFW-Init", "sfw_init", None),
    "sfw_ksupport": ("SFW, K-support ball", "sfw_ksupport", None),
    "sfw_best": ("SFW, best variant", "sfw_best", None),
    "sfw_best_recon": ("SFW, best variant for reconstruction + reconstruction", "sfw_best_recon",
                       "recon"),
    "sfw_ksup_wu_recon": (f"SFW, K-support ball, weights only, {SFW_WARMUP:g}-epoch warm-up + "
                          "reconstruction", "sfw_ksup_wu", "recon"),
    "cram": (f"CrAM+ {_WARM}", "cram", None),
    "cram_recon": (f"CrAM+ {_WARM} + reconstruction", "cram", "recon"),
    "acdc": (f"AC/DC (target {100 * ACDC_SPARSITY:g}%)", "acdc", None),
    "acdc_recon": (f"AC/DC (target {100 * ACDC_SPARSITY:g}%) + reconstruction", "acdc", "recon"),
    "sfw_cram": (f"SFW fed the CrAM+ gradient {_WARM}", "sfw_cram", None),
    "sfw_cram_recon": (f"SFW fed the CrAM+ gradient {_WARM} + reconstruction", "sfw_cram",
                       "recon"),
    "cram_deploy": (f"CrAM+ {_WARM}, sparsities 90-99%", "cram_deploy", None),
    "cram_deploy_recon": (f"CrAM+ {_WARM}, sparsities 90-99% + reconstruction", "cram_deploy",
                          "recon"),
}  # fmt: skip
METHOD_ORDER = tuple(ROWS)


@dataclass
class ReproduceConfig:
    dataset: str = "fashion-mnist"
    models: tuple[str, ...] = ("lenet300", "lenet5")
    seeds: int = 3
    epochs: int = 20
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    data_dir: str | None = None
    device: str = "auto"
    jobs: int = 1
    explore: bool = True
    variants: tuple[str, ...] = tuple(VARIANTS)
    limit: int | None = None
    best_from: str | None = None  # reuse this model's best.json instead of exploring
    allow_mixed_revisions: bool = False  # finish a grid whose files come from other revisions
    calibration_size: int = 2048  # training images for reconstruction and Wanda

    def validate(self) -> ReproduceConfig:
        if self.seeds < 1 or self.epochs < 1 or self.jobs < 1 or self.finetune_epochs < 0:
            raise ValueError(
                f"Invalid reproduce settings: seeds={self.seeds}, epochs={self.epochs}, "
                f"jobs={self.jobs}, finetune_epochs={self.finetune_epochs} (expected positive integers)"
            )
        if self.calibration_size < 1:
            raise ValueError(
                f"Invalid calibration_size: {self.calibration_size!r} (expected an integer >= 1)"
            )
        from ..models import MODELS

        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"Invalid model: {m!r} (expected one of {', '.join(MODELS)})")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"Invalid variant: {v!r} (expected one of {', '.join(VARIANTS)})")
        return self

    def train_config(self, model: str, overrides: dict[str, Any], seed: int) -> TrainConfig:
        return TrainConfig.from_dict({
            "dataset": self.dataset, "model": model, "epochs": self.epochs, "seed": seed,
            "data_dir": self.data_dir, "device": self.device, "limit": self.limit, **overrides,
        })  # fmt: skip


# ---------------------------------------------------------------- tasks (run in workers)


def _worker_init() -> None:
    import torch

    from .provenance import record_start

    record_start()
    torch.set_num_threads(int(os.environ.get("SFWPRUNE_WORKER_THREADS", "1")))


def check_same_config(run: Path, cfg: TrainConfig) -> None:
    """Refuse a finished run folder whose training config is not ``cfg`` (e.g. the folder of a
    selected variant that a new selection replaced): reusing it would report another method."""
    from .runner import read_config

    diff = _first_difference(read_config(run).to_dict(), cfg.to_dict())
    if diff:
        raise ValueError(
            f"Invalid run folder: {str(run)!r} holds a finished run of another config ({diff}); "
            "delete the folder to train it again, or choose a new --out"
        )


def _first_difference(held: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """``"key: held, this grid wants wanted"`` for the first key (sorted) that differs."""
    diff = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
    if not diff:
        return None
    k = diff[0]
    return f"{k}: {held.get(k)!r}, this grid wants {wanted.get(k)!r}"


def train_and_sweep(
    cfg_dict: dict[str, Any],
    run_dir: str,
    sparsities: list[float],
    sweeps: dict[str | None, dict[str, Any]],
    calibration_size: int = 2048,
) -> str:
    """Train a run (resuming if cut) and write its sweeps: ``sweep[-TAG].json`` per entry of
    ``sweeps`` (tag -> :class:`SweepConfig` fields, which may name their own ``sparsities``;
    otherwise ``sparsities``), each skipped when a file of that very sweep is already there
    (:func:`check_same_sweep`)."""
    from .runner import train_run
    from .sweep import SweepConfig, sweep_file_name, sweep_run

    cfg = TrainConfig.from_dict(cfg_dict)
    run = Path(run_dir)
    if (run / SUMMARY_FILE).is_file():
        check_same_config(run, cfg)  # a finished run is reused only for the config it ran
    else:
        train_run(cfg, run, resume="auto", quiet=True)
    for tag, fields in sweeps.items():
        fields = {"seed": cfg.seed, "calibration_size": calibration_size,
                  "sparsities": sparsities, **fields}  # fmt: skip
        fields["sparsities"] = tuple(fields["sparsities"])
        sweep = SweepConfig(**fields)
        path = run / f"{sweep_file_name(tag)}.json"
        if path.is_file():
            check_same_sweep(path, sweep)  # reused only for the sweep it holds
            continue
        sweep_run(run, sweep, tag=tag)
    return run_dir


def check_same_sweep(path: Path, sweep: Any) -> None:
    """Refuse a sweep file whose recorded sweep config is not ``sweep`` (a
    :class:`~.sweep.SweepConfig`; fields a file from before them lacks take their defaults):
    reusing it would report another pruning."""
    from dataclasses import asdict

    from .sweep import SweepConfig

    recorded = json.loads(path.read_text()).get("config", {}).get("sweep", {})
    held = json.loads(json.dumps({**asdict(SweepConfig()), **recorded}))
    diff = _first_difference(held, json.loads(json.dumps(asdict(sweep))))
    if diff:
        raise ValueError(
            f"Invalid sweep file: {str(path)!r} holds another sweep ({diff}); delete it to sweep "
            "again"
        )


def finetune_levels(
    run_dir: str, out_file: str, sparsities: list[float], epochs: int, lr: float
) -> str:
    """Method 3: for each level, prune the SGD run by global magnitude, fine-tune ``epochs`` with
    the masks fixed (SGD, momentum 0.9, cosine from ``lr``), evaluate. Records time per level."""
    import torch

    from ..prune import prune_
    from ..train import OptimizerSpec, build_optimizer, build_scheduler, evaluate, fit
    from .provenance import provenance
    from .runner import load_trained, test_loader, train_loader

    if Path(out_file).is_file():
        return out_file
    cfg, model, data = load_trained(run_dir)
    device = next(model.parameters()).device
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    start = time.perf_counter()
    for sparsity in sparsities:
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        masks = prune_(model, sparsity)
        torch.manual_seed(cfg.seed + 1000)
        loader = train_loader(cfg, data, device, seed=cfg.seed + 1000)
        opt = build_optimizer(model, OptimizerSpec("sgd", lr=lr))
        if epochs > 0:
            sched = build_scheduler(opt, "cosine", epochs * len(loader))
            fit(model, loader, opt, epochs=epochs, scheduler=sched, masks=masks)
        seconds = time.perf_counter() - t0
        test = evaluate(model, test_loader(cfg, data, device))
        weights = [p for name, p in model.named_parameters() if name in masks]
        zeros = sum(int((p == 0).sum()) for p in weights)
        rows.append({
            "sparsity": sparsity, "measured_sparsity": zeros / sum(p.numel() for p in weights),
            "accuracy": test["accuracy"], "loss": test["loss"], "retrain_seconds": seconds,
        })  # fmt: skip
    _io.atomic_write_json(out_file, {
        "config": {"train": cfg.to_dict(), "finetune_epochs": epochs, "finetune_lr": lr,
                   "sparsities": sparsities},
        "provenance": provenance(device, wall_seconds=time.perf_counter() - start),
        "rows": rows,
    })  # fmt: skip
    return out_file


# ---------------------------------------------------------------- running the jobs


def _job(expected: str, allow_mixed: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a worker, first checking the worker runs the grid's revision."""
    from .provenance import git_revision, record_start

    record_start()
    if not allow_mixed and git_revision() != expected:
        raise ValueError(
            f"Invalid reproduce: a worker runs revision {git_revision()}, the grid {expected} "
            "(the code changed while the grid ran; pass --allow-mixed-revisions to accept it)"
        )
    return fn(*args)


class _InProcess(cf.Executor):
    """``jobs=1``: each job runs at ``submit``, in this process, in submission order."""

    def submit(self, fn, /, *args, **kwargs):
        future: cf.Future = cf.Future()
        future.set_result(fn(*args, **kwargs))  # an error stops the grid at once
        return future


class _Grid:
    """The grid's jobs on a :mod:`concurrent.futures` executor. A job is submitted once its
    inputs exist: training runs (and their sweeps) first, a fine-tuning job when its SGD run is
    done, the best-variant selection when every candidate of its model is done, and the
    best variant's runs after that."""

    def __init__(self, pool: cf.Executor, expected: str, allow_mixed: bool, log):
        self.pool, self.expected, self.allow_mixed, self.log = pool, expected, allow_mixed, log
        self.running: dict[cf.Future, tuple[str, Callable[[], None] | None]] = {}
        self.finished = 0

    def submit(self, key: str, fn: Callable[..., Any], *args: Any, then=None) -> None:
        future = self.pool.submit(_job, self.expected, self.allow_mixed, fn, *args)
        self.running[future] = (key, then)

    def wait(self) -> None:
        while self.running:
            done, _ = cf.wait(list(self.running), return_when=cf.FIRST_COMPLETED)
            for future in [f for f in self.running if f in done]:  # submission order
                key, then = self.running.pop(future)
                future.result()  # a job's error stops the grid here
                self.finished += 1
                self.log(f"done: {key}  ({self.finished} finished, {len(self.running)} running)")
                if then is not None:
                    then()


def job_pool(jobs: int) -> cf.Executor:
    """The grid's executor: in-process for one job, else ``jobs`` spawned worker processes."""
    if jobs == 1:
        return _InProcess()
    return cf.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
    )  # fmt: skip


def grid_revision(out: Path, allow_mixed: bool) -> str:
    """This process's code revision, after refusing a grid folder that holds another one's
    results (unless ``allow_mixed``)."""
    from .provenance import git_revision

    current = git_revision()
    if not allow_mixed and out.is_dir():
        check_revisions(out, current)
    return current


def run_dir_of(out: Path, model: str, method: str, seed: int) -> Path:
    return out / model / method / f"seed{seed}"


def _submit_all(grid: _Grid, rc: ReproduceConfig, out: Path) -> None:
    """Every job of the grid, the selection runs first (they gate the best variant)."""
    sp = list(rc.sparsities)
    for model in rc.models if rc.explore else ():
        names = ("sgd", "sfw", *rc.variants)
        left = set(names)

        def candidate_done(name: str, model: str = model, left: set = left) -> None:
            left.discard(name)
            if not left:  # all candidates trained and swept: select, then train the winner
                select_best(str(out), model, rc.variants)
                _submit_best(grid, rc, out, model)

        for name in names:
            overrides = TRAINED_METHODS.get(name) or VARIANTS[name]
            cfg = rc.train_config(model, overrides, SELECTION_SEED)
            run = out / model / "explore" / name / f"seed{SELECTION_SEED}"
            grid.submit(f"{model}/explore/{name}", train_and_sweep, cfg.to_dict(), str(run), sp,
                        sweeps_of(model, False), rc.calibration_size,
                        then=functools.partial(candidate_done, name))  # fmt: skip
    for model in rc.models:
        if not rc.explore and (out / model / "best.json").is_file():
            _submit_best(grid, rc, out, model)
        ft_dir = out / model / "sgd_finetune"
        ft_dir.mkdir(parents=True, exist_ok=True)
        for seed in range(rc.seeds):
            for method, overrides in TRAINED_METHODS.items():
                run = run_dir_of(out, model, method, seed)
                cfg = rc.train_config(model, overrides, seed)
                finetune = None
                if method == "sgd":  # the fine-tuning baseline starts from this run
                    finetune = functools.partial(
                        grid.submit, f"{model}/sgd_finetune/seed{seed}", finetune_levels,
                        str(run), str(ft_dir / f"seed{seed}.json"), sp, rc.finetune_epochs,
                        rc.finetune_lr,
                    )  # fmt: skip
                sweeps = sweeps_of(model, method == "sgd")
                grid.submit(f"{model}/{method}/seed{seed}", train_and_sweep, cfg.to_dict(),
                            str(run), sp, sweeps, rc.calibration_size, then=finetune)  # fmt: skip


def _best_method(best: dict[str, Any], pipeline: str) -> str:
    """The trained method whose runs hold the winner of ``pipeline`` ("plain" or "recon"):
    the paper default's own runs, the plain winner's runs, or runs of their own."""
    variant = best["variant"] if pipeline == "plain" else best.get("recon", best)["variant"]
    if variant == "sfw":
        return "sfw"
    if pipeline == "recon" and variant == best["variant"]:
        return "sfw_best"
    return "sfw_best" if pipeline == "plain" else "sfw_best_recon"


def _submit_best(grid: _Grid, rc: ReproduceConfig, out: Path, model: str) -> None:
    best = json.loads((out / model / "best.json").read_text())
    for pipeline in ("plain", "recon"):
        method = _best_method(best, pipeline)
        if method == "sfw" or (pipeline == "recon" and method == "sfw_best"):
            continue  # those runs are trained already (or by the plain pipeline)
        variant = best["variant"] if pipeline == "plain" else best.get("recon", best)["variant"]
        for seed in range(rc.seeds):
            cfg = rc.train_config(model, VARIANTS[variant], seed)
            run = run_dir_of(out, model, method, seed)
            grid.submit(f"{model}/{method}/seed{seed}", train_and_sweep, cfg.to_dict(), str(run),
                        list(rc.sparsities), sweeps_of(model, False), rc.calibration_size)  # fmt: skip


RESULT_FILES = ("config.json", "summary.json", "sweep*.json", "best.json", "seed*.json")


def grid_revisions(out: Path) -> dict[str, list[Path]]:
    """Each code revision found in the grid's results files, with the files that carry it."""
    from .provenance import revision_of

    found: dict[str, list[Path]] = {}
    for pattern in RESULT_FILES:
        for path in sorted(out.rglob(pattern)):
            try:
                rev = revision_of(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # not ours to judge here; the job that reads it says what is wrong
            if rev is not None:
                found.setdefault(rev, []).append(path)
    return found


def check_revisions(out: Path, current: str) -> None:
    """Refuse to add results of revision ``current`` to a grid holding another revision's."""
    others = {rev: paths for rev, paths in grid_revisions(out).items() if rev != current}
    if others:
        rev, paths = next(iter(others.items()))
        raise ValueError(
            f"Invalid reproduce: {str(out)!r} holds results of {len(others)} other code "
            f"revision(s) (e.g. {rev} in {str(paths[0])!r}), this process runs {current}; pass "
            "--allow-mixed-revisions to finish it anyway, or choose a new --out"
        )


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"]


def select_best(out_dir: str, model: str, variants: tuple[str, ...]) -> str:
    """Pick the SFW variant with the best mean accuracy at 90/95/98% sparsity among those whose
    dense accuracy is within ``DENSE_TOLERANCE`` points of SGD's, on the selection seed: for
    plain magnitude pruning (global or layer scope) and, separately, for pruning followed by
    reconstruction (a variant with better dense accuracy may win there)."""
    from .provenance import provenance

    out = Path(out_dir)
    base = out / model / "explore"
    sgd_dense = _rows(base / "sgd" / f"seed{SELECTION_SEED}" / "sweep.json")[0]["accuracy"]
    candidates = []
    for name in ("sfw", *variants):
        run = base / name / f"seed{SELECTION_SEED}"
        for scope, fname in (
            ("global", "sweep.json"), ("layer", "sweep-layer.json"), ("recon", "sweep-recon.json")
        ):  # fmt: skip
            rows = _rows(run / fname)
            by = {r["sparsity"]: r["accuracy"] for r in rows}
            score = sum(by.get(s, 0.0) for s in (0.9, 0.95, 0.98)) / 3
            ok = rows[0]["accuracy"] >= sgd_dense - DENSE_TOLERANCE
            candidates.append({"variant": name, "scope": scope, "score": score,
                               "dense": rows[0]["accuracy"], "dense_ok": ok})  # fmt: skip

    def pick(pool: list[dict[str, Any]]) -> dict[str, Any]:
        return max([c for c in pool if c["dense_ok"]] or pool, key=lambda c: c["score"])

    best = pick([c for c in candidates if c["scope"] != "recon"])
    recon = pick([c for c in candidates if c["scope"] == "recon"])
    _io.atomic_write_json(out / model / "best.json", {
        **best, "recon": recon, "selection_seed": SELECTION_SEED, "sgd_dense": sgd_dense,
        "provenance": provenance(),
        "rule": "max mean accuracy at 90/95/98% sparsity among variants whose dense accuracy is "
                f"within {DENSE_TOLERANCE} points of SGD's (selection seed only; reported seeds are "
                "different), chosen separately for plain pruning (global or layer scope) and for "
                "reconstruction. The tolerance was first 0.5; no candidate met it on "
                "LeNet-300-100, so it was widened to 2.0 after seeing the selection-seed results "
                "(an earlier grid)",
        "candidates": candidates,
    })  # fmt: skip
    return best["variant"]


def run_reproduce(
    rc: ReproduceConfig,
    out_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or finish) the grid; returns ``out_dir``. The report is :func:`write_report`."""
    from .provenance import provenance

    rc.validate()
    out = Path(out_dir)
    current = grid_revision(out, rc.allow_mixed_revisions)
    out.mkdir(parents=True, exist_ok=True)
    for model in rc.models:  # per model: grids of different models may differ (epochs, seeds)
        (out / model).mkdir(parents=True, exist_ok=True)
        _io.atomic_write_json(
            out / model / "reproduce_config.json",
            {**asdict(rc), "models": [model], "provenance": provenance()},
        )
    if rc.best_from is not None:
        source = out / rc.best_from / "best.json"
        if not source.is_file():
            raise FileNotFoundError(f"Invalid best_from: {rc.best_from!r} (no {source})")
        best = json.loads(source.read_text())
        best["selected_on"] = rc.best_from
        for model in rc.models:
            if model != rc.best_from:
                (out / model).mkdir(parents=True, exist_ok=True)
                _io.atomic_write_json(out / model / "best.json", best)
    start = time.perf_counter()
    with job_pool(rc.jobs) as pool:
        grid = _Grid(pool, current, rc.allow_mixed_revisions, log)
        _submit_all(grid, rc, out)
        grid.wait()
    log(f"grid finished in {time.perf_counter() - start:.0f}s")
    return out


def best_run_dir(out: Path, model: str, seed: int, pipeline: str = "plain") -> tuple[Path, str]:
    """Run folder and sweep file of the best variant for ``seed``: of plain pruning (its
    selected scope) or of pruning + reconstruction."""
    best = json.loads((out / model / "best.json").read_text())
    method = _best_method(best, pipeline)
    if pipeline == "recon":
        return run_dir_of(out, model, method, seed), "sweep-recon.json"
    fname = "sweep.json" if best["scope"] == "global" else "sweep-layer.json"
    return run_dir_of(out, model, method, seed), fname
