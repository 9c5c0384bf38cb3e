"""The ``sfwprune`` command line: train, sweep, prune, plot, demo.

Every subcommand is a thin layer over the library. Bad input prints one line
(``sfwprune: error: ...``) and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2
_PARTIAL = (
    "use the latest checkpoint of a run that is still training or did not finish (the epoch is "
    "recorded); without it such a run is refused"
)


_RECONSTRUCT = (
    "after masking, re-solve each layer's kept weights to match the dense layer outputs on "
    "calibration images (no labels, no gradient training; docs/algorithm.md §6)"
)
_STRUCTURE = (
    "channel (remove whole output units; prune writes the physically smaller model) or N:M, "
    "e.g. 2:4 (N largest |w| of every M consecutive row entries; prune writes 2:4 matrices for "
    "torch.sparse.to_sparse_semi_structured); default: unstructured"
)
_NORM = "channel: rank units by their L1 (1, Li et al. 2017) or L2 (2) norm; default 2"
_INDIVISIBLE = "N:M: error (default) or skip (rows whose length M does not divide stay dense)"
_CALIBRATION = (
    "training images for --reconstruct and --criterion wanda (a fixed seeded draw); default 2048"
)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise CLIError(f"{self.prog}: {message}")


def _arg(check):
    """An argparse ``type`` from one of :mod:`sfwprune._checks`' parsers (message kept)."""

    def convert(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _path(text: str) -> Path:
    """A path argument; an empty one (``--out ""``) is refused, not read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"Invalid path: {text!r} (expected a file or folder name)")
    return Path(text)


def _add_reconstruct_args(p: argparse.ArgumentParser, gradual_help: str) -> None:
    """``--reconstruct``, ``--calibration-size``, ``--gradual``, ``--gradual-step`` and
    ``--relu-aware`` (sweep and prune)."""
    from .prune.sweep import GRADUAL_STEP

    p.add_argument("--reconstruct", action="store_true", help=_RECONSTRUCT)
    p.add_argument("--calibration-size", type=int, default=2048, help=_CALIBRATION)
    p.add_argument("--gradual", action="store_true", help=gradual_help)
    p.add_argument(
        "--gradual-step", type=float, default=GRADUAL_STEP,
        help="with --gradual: the largest fraction of the kept weights one step prunes; levels "
        f"further apart get steps in between (default {GRADUAL_STEP}; 1: the levels alone)",
    )  # fmt: skip
    p.add_argument(
        "--relu-aware", action="store_true",
        help="with --reconstruct: a layer whose output goes straight into a ReLU matches what "
        "the ReLU passes on, not its raw output (docs/algorithm.md §6)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from ._checks import parse_seed, parse_sparsities, parse_sparsity
    from .experiments.config import TrainConfig
    from .experiments.flags import add_flags
    from .experiments.prune import DTYPES
    from .prune.masks import CRITERIA, INCLUDES, SCOPES

    parser = _Parser(
        prog="sfwprune",
        description="Train with Stochastic Frank-Wolfe, prune to any sparsity in one shot.",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a run into RUN_DIR")
    p.add_argument("--out", type=_path, required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    p.add_argument(
        "--config", type=_path, help="JSON file of TrainConfig fields (flags override it)"
    )
    add_flags(p, TrainConfig)

    p = sub.add_parser("sweep", help="accuracy at each sparsity, no retraining")
    p.add_argument("run_dir", type=_path)
    p.add_argument(
        "--sparsities", type=_arg(parse_sparsities), help="comma-separated, e.g. 0,0.5,0.9"
    )
    p.add_argument("--scope", default="global", help=" | ".join(SCOPES))
    p.add_argument("--include", default="weights", help=" | ".join(INCLUDES))
    p.add_argument("--criterion", default="magnitude", help=" | ".join(CRITERIA))
    p.add_argument("--bn-recalibrate", action="store_true", help="recompute BN stats per level")
    _add_reconstruct_args(
        p, "with --reconstruct: levels in increasing order, each pruning on from the previous "
        "level's reconstructed weights",
    )  # fmt: skip
    p.add_argument("--seed", type=_arg(parse_seed), default=0, help="seed of the random criterion")
    p.add_argument("--tag", help="write sweep-TAG.json instead of sweep.json")
    p.add_argument("--allow-partial", action="store_true", help=_PARTIAL)
    p.add_argument("--structure", help=_STRUCTURE + " (channel levels default to 0,0.25,0.5,0.75)")
    p.add_argument("--norm", type=int, default=2, help=_NORM)
    p.add_argument("--indivisible", default="error", help=_INDIVISIBLE)

    p = sub.add_parser("prune", help="prune a run once and export it compactly")
    p.add_argument("run_dir", type=_path)
    p.add_argument(
        "--sparsity", type=_arg(parse_sparsity), help="required, except for --structure N:M"
    )
    p.add_argument("--out", type=_path, required=True, help="output file (.pt)")
    p.add_argument("--scope", default="global", help=" | ".join(SCOPES))
    p.add_argument("--include", default="weights", help=" | ".join(INCLUDES))
    p.add_argument("--criterion", default="magnitude", help=" | ".join(CRITERIA))
    p.add_argument("--dtype", default="float32", help=" | ".join(DTYPES))
    p.add_argument("--bn-recalibrate", action="store_true")
    _add_reconstruct_args(
        p, "with --reconstruct: reach --sparsity in steps, each pruning on from the previous "
        "step's reconstructed weights (as sweep --gradual)",
    )  # fmt: skip
    p.add_argument("--allow-partial", action="store_true", help=_PARTIAL)
    p.add_argument("--structure", help=_STRUCTURE)
    p.add_argument("--norm", type=int, default=2, help=_NORM)
    p.add_argument("--indivisible", default="error", help=_INDIVISIBLE)

    p = sub.add_parser("plot", help="accuracy vs sparsity (or --weights histogram) of runs")
    p.add_argument("run_dirs", type=_path, nargs="+")
    p.add_argument("--out", type=_path, required=True, help="figure file (.png, .pdf, .svg)")
    p.add_argument("--weights", action="store_true", help="weight-magnitude histogram instead")
    p.add_argument("--tag", help="plot sweep-TAG.json")

    p = sub.add_parser("reproduce", help="the Fashion-MNIST grid: every method, seeds, RESULTS.md")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--out",
        type=_path,
        help="grid folder (runs/reproduce; --structured: runs/reproduce-structured)",
    )
    p.add_argument("--models", default="lenet300,lenet5", help="comma-separated model names")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--calibration-size", type=int, default=2048, help=_CALIBRATION)
    p.add_argument("--limit", type=int, help="first N training images only (quick checks)")
    p.add_argument("--no-explore", action="store_true", help="skip the best-variant search")
    p.add_argument("--variants", help="comma-separated candidate names for the best variant")
    p.add_argument("--best-from", help="reuse MODEL's selected best variant (with --no-explore)")
    p.add_argument(
        "--allow-mixed-revisions",
        action="store_true",
        help="finish a grid whose runs were made by another code revision",
    )
    p.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md")
    p.add_argument("--no-report", action="store_true", help="run the grid, skip RESULTS.md")
    p.add_argument(
        "--structured",
        action="store_true",
        help="the structured grid instead (issue 14: SGD, SFW-channel, SFW-2:4; channel and 2:4 "
        "sweeps, CPU latency); its report goes to RESULTS-structured.md",
    )
    p.add_argument(
        "--results", type=_path, help="RESULTS.md (with --structured: RESULTS-structured.md)"
    )
    p.add_argument("--docs", type=_path, default=Path("docs"))

    p = sub.add_parser("demo", help="the main job: SFW vs SGD on Fashion-MNIST, swept and plotted")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", type=_path, default=Path("runs/demo"))
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    return parser


def _train_config(args: argparse.Namespace):
    from .experiments.config import TrainConfig
    from .experiments.flags import given
    from .experiments.runner import CONFIG_FILE, read_config

    if args.config is not None:
        cfg = TrainConfig.from_json(args.config)
    elif args.resume and (args.out / CONFIG_FILE).is_file():
        cfg = read_config(args.out)
    else:
        cfg = TrainConfig()
    return cfg.replace(**given(args, TrainConfig))


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiments.runner import train_run

    cfg = _train_config(args)
    created = not args.out.exists()
    try:
        result = train_run(cfg, args.out, resume=args.resume, quiet=args.quiet)
    except (ValueError, OSError):
        # Bad input found after the run folder was made (e.g. missing data): leave no trace.
        from .experiments.runner import LOCK_FILE

        if created and args.out.is_dir() and {p.name for p in args.out.iterdir()} <= {LOCK_FILE}:
            (args.out / LOCK_FILE).unlink(missing_ok=True)
            args.out.rmdir()
        raise
    final = result.metrics[-1] if result.metrics else {}
    if final and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(
            f"{args.out}: test accuracy {final['test_accuracy']:.2f}% after {final['epoch']} epochs"
        )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .experiments.config import DEFAULT_SPARSITIES
    from .experiments.structured import CHANNEL_SPARSITIES
    from .experiments.sweep import SweepConfig, format_rows, sweep_run
    from .prune.structured import parse_structure

    levels = DEFAULT_SPARSITIES
    structured = {}
    if args.structure is not None:
        nm = parse_structure(args.structure)
        levels = CHANNEL_SPARSITIES if nm is None else (1 - nm[0] / nm[1],)
        structured = {"structure": args.structure, "norm": args.norm,
                      "indivisible": args.indivisible}  # fmt: skip
    elif args.norm != 2 or args.indivisible != "error":
        raise ValueError(
            f"Invalid --norm/--indivisible: {args.norm}/{args.indivisible} (for --structure only)"
        )
    sweep = SweepConfig(
        sparsities=tuple(args.sparsities or levels), scope=args.scope,
        include=args.include, criterion=args.criterion, bn_recalibrate=args.bn_recalibrate,
        seed=args.seed, reconstruct=args.reconstruct, calibration_size=args.calibration_size,
        gradual=args.gradual, gradual_step=args.gradual_step, relu_aware=args.relu_aware,
        **structured,
    ).validate()  # fmt: skip
    result = sweep_run(args.run_dir, sweep, tag=args.tag, allow_partial=args.allow_partial)
    if not result["run"]["finished"]:
        print(
            f"note: {args.run_dir} did not finish; swept its epoch-{result['run']['epoch']} checkpoint"
        )
    print(format_rows(result["rows"]))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from .experiments.prune import prune_run
    from .prune.structured import parse_structure

    sparsity = args.sparsity
    if sparsity is None:
        nm = parse_structure(args.structure) if args.structure is not None else None
        if nm is None:
            raise CLIError("sfwprune prune: the following arguments are required: --sparsity")
        sparsity = 1 - nm[0] / nm[1]
    result = prune_run(
        args.run_dir, sparsity, args.out, scope=args.scope, include=args.include,
        criterion=args.criterion, dtype=args.dtype, bn_recalibrate=args.bn_recalibrate,
        reconstruct=args.reconstruct, calibration_size=args.calibration_size,
        gradual=args.gradual, gradual_step=args.gradual_step, relu_aware=args.relu_aware,
        allow_partial=args.allow_partial, structure=args.structure, norm=args.norm,
        indivisible=args.indivisible,
    )  # fmt: skip
    print(result.report)
    if result.structure is not None:
        lat, (dense, small) = result.latency, result.params
        what = "fraction of units removed" if result.structure == "channel" else "sparsity"
        print(
            f"test accuracy of {args.structure} pruning at {100 * result.sparsity:g}% ({what}), "
            f"rebuilt from the file: {result.accuracy:.2f}% ({result.dtype} weights of epoch "
            f"{result.epoch}) -> wrote {result.out}"
        )
        print(
            f"parameters {dense:,} -> {small:,}; CPU latency at batch 1 ({lat['threads']} "
            f"thread(s), median): dense {lat['dense_ms']:.3f} ms, pruned {lat['small_ms']:.3f} ms "
            f"({lat['speedup']:.2f}x)"
        )
        print("load it with sfwprune.experiments.prune.load_small(path)")
        return 0
    print(
        f"test accuracy at {100 * result.sparsity:g}% sparsity: {result.accuracy:.2f}% "
        f"({result.dtype} weights of epoch {result.epoch}) -> wrote {result.out}"
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .experiments.prune import plot_runs

    out = plot_runs(list(args.run_dirs), args.out, weights=args.weights, tag=args.tag)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import DEMO_EPOCHS, run_demo

    epochs = DEMO_EPOCHS if args.epochs is None else args.epochs
    run_demo(args.out, epochs=epochs, data_dir=args.data_dir, quiet=args.quiet)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.report import write_report
    from .experiments.reproduce import ReproduceConfig, run_reproduce

    if args.structured:
        return _reproduce_structured(args)
    args.out = args.out or Path("runs/reproduce")
    if not args.report_only:
        rc = ReproduceConfig(
            dataset=args.dataset, models=tuple(m for m in args.models.split(",") if m),
            seeds=args.seeds, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
            data_dir=args.data_dir, device=args.device, jobs=args.jobs,
            explore=not args.no_explore, limit=args.limit, best_from=args.best_from,
            allow_mixed_revisions=args.allow_mixed_revisions,
            calibration_size=args.calibration_size,
            **({"variants": tuple(args.variants.split(","))} if args.variants else {}),
        )  # fmt: skip
        run_reproduce(rc, args.out, log=(lambda s: None) if args.quiet else print)
    if not args.no_report:
        path = write_report(args.out, args.results or Path("RESULTS.md"), args.docs)
        print(f"wrote {path}")
    return 0


def _reproduce_structured(args: argparse.Namespace) -> int:
    from .experiments.structured import (
        REPORT_FILE,
        StructuredConfig,
        run_structured,
        write_structured_report,
    )

    unused = [flag for flag, on in (("--no-explore", args.no_explore), ("--variants",
              args.variants), ("--best-from", args.best_from)) if on]  # fmt: skip
    if unused:
        raise ValueError(f"Invalid flags: {', '.join(unused)} (not used by --structured)")
    args.out = args.out or Path("runs/reproduce-structured")
    if not args.report_only:
        sc = StructuredConfig(
            dataset=args.dataset, models=tuple(m for m in args.models.split(",") if m),
            seeds=args.seeds, epochs=args.epochs, data_dir=args.data_dir, device=args.device,
            jobs=args.jobs, limit=args.limit, calibration_size=args.calibration_size,
            allow_mixed_revisions=args.allow_mixed_revisions,
        )  # fmt: skip
        run_structured(sc, args.out, log=(lambda s: None) if args.quiet else print)
    if not args.no_report:
        path = write_structured_report(args.out, args.results or Path(REPORT_FILE), args.docs)
        print(f"wrote {path}")
    return 0


_COMMANDS = {
    "train": _cmd_train, "sweep": _cmd_sweep, "prune": _cmd_prune, "plot": _cmd_plot,
    "demo": _cmd_demo, "reproduce": _cmd_reproduce,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 training failure)."""
    try:
        from .experiments.provenance import record_start

        record_start()  # the code revision this process runs, before anything can change it
        args = build_parser().parse_args(argv)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"Invalid --threads: {args.threads} (expected an integer >= 1)")
            import torch

            torch.set_num_threads(args.threads)
        from .experiments.runner import sigterm_as_interrupt

        with sigterm_as_interrupt():  # SIGTERM stops as cleanly as Ctrl-C
            return _COMMANDS[args.command](args)
    except (CLIError, ValueError, OSError) as exc:  # OSError: unwritable path, disk full ...
        print(_one_line(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        from .experiments.runner import Terminated

        if isinstance(exc, Terminated):
            print("sfwprune: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print("sfwprune: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from .train import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(_one_line(exc), file=sys.stderr)
            return 1
        raise


def _one_line(exc: BaseException) -> str:
    """``sfwprune: error: <message>`` on one line (a multi-line message is joined, not cut)."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, FileNotFoundError):
        text = f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    else:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    msg = text or type(exc).__name__
    return msg if msg.startswith("sfwprune") else f"sfwprune: error: {msg}"


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
