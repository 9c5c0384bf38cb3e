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


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise CLIError(f"{self.prog}: {message}")


def _sparsities(text: str) -> list[float]:
    from .experiments.config import parse_sparsities

    try:
        return parse_sparsities(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sparsity(text: str) -> float:
    values = _sparsities(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"Invalid sparsity: {text!r} (expected one number)")
    return values[0]


def _rescale(text: str) -> str | None:
    if text not in ("gradient", "diameter", "none"):
        raise argparse.ArgumentTypeError(
            f"Invalid rescale: {text!r} (expected gradient, diameter or none)"
        )
    return None if text == "none" else text


def _add_train_args(p: argparse.ArgumentParser) -> None:
    # default=None everywhere: only flags the user gave override the config file / defaults.
    add = p.add_argument
    add("--config", type=Path, help="JSON file of TrainConfig fields (flags override it)")
    add("--dataset", help="fashion-mnist | cifar10 | tiny-imagenet | digits | synthetic")
    add("--model", help="lenet300 | lenet5 | lenet5bn | resnet18 | vgg16")
    add("--optimizer", help="sfw | sgd")
    add("--epochs", type=int)
    add("--batch-size", type=int)
    add("--lr", type=float, help="default 1.0 for sfw, 0.1 for sgd")
    add("--momentum", type=float)
    add("--weight-decay", type=float, help="sgd only (default 5e-4)")
    add("--schedule", help="step (÷10 at 1/3 and 2/3) | cosine | constant")
    add("--constraint", help="k_sparse | k_support | l1 | l2 | linf | unconstrained (sfw)")
    add("--k-frac", type=float, help="K = max(k_min, k_frac·numel) (default 0.05)")
    add("--k-min", type=int)
    add("--value", type=float, help="set size: L2 diameter = 2·value·E||θ_init|| (default 15)")
    add("--mode", help="initialization | radius | diameter")
    add("--rescale", type=_rescale, default=argparse.SUPPRESS, help="gradient | diameter | none")
    add("--constrain", help="all | weights: which tensors SFW constrains")
    add("--sfw-init", action="store_const", const=True, help="learn the init scales (SFW-Init)")
    add("--sfw-init-iters", type=int)
    add("--data-dir", help="folder holding the dataset's files")
    add("--augment", action=argparse.BooleanOptionalAction, help="random crop + flip")
    add("--limit", type=int, help="use only the first N training images (quick runs)")
    add("--image-size", type=int)
    add("--seed", type=int)
    add("--device", help="auto | cpu | cuda[:N]")
    add("--precision", help="fp32 | bf16 (autocast)")


_TRAIN_FIELDS = (
    "dataset", "model", "optimizer", "epochs", "batch_size", "lr", "momentum", "weight_decay",
    "schedule", "constraint", "k_frac", "k_min", "value", "mode", "rescale", "constrain",
    "sfw_init", "sfw_init_iters", "data_dir", "augment", "limit", "image_size", "seed", "device",
    "precision",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sfwprune",
        description="Train with Stochastic Frank-Wolfe, prune to any sparsity in one shot.",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a run into RUN_DIR")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    _add_train_args(p)

    p = sub.add_parser("sweep", help="accuracy at each sparsity, no retraining")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sparsities", type=_sparsities, help="comma-separated, e.g. 0,0.5,0.9")
    p.add_argument("--scope", default="global", help="global | layer")
    p.add_argument("--include", default="weights", help="weights | all")
    p.add_argument("--criterion", default="magnitude", help="magnitude | random")
    p.add_argument("--bn-recalibrate", action="store_true", help="recompute BN stats per level")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("--tag", help="write sweep-TAG.json instead of sweep.json")

    p = sub.add_parser("prune", help="prune a run once and export it compactly")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sparsity", type=_sparsity, required=True)
    p.add_argument("--out", type=Path, required=True, help="output file (.pt)")
    p.add_argument("--scope", default="global", help="global | layer")
    p.add_argument("--include", default="weights", help="weights | all")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--bn-recalibrate", action="store_true")

    p = sub.add_parser("plot", help="accuracy vs sparsity (or --weights histogram) of runs")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="figure file (.png, .pdf, .svg)")
    p.add_argument("--weights", action="store_true", help="weight-magnitude histogram instead")
    p.add_argument("--tag", help="plot sweep-TAG.json")

    p = sub.add_parser("reproduce", help="the Fashion-MNIST grid: every method, seeds, RESULTS.md")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--models", default="lenet300,lenet5", help="comma-separated model names")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--limit", type=int, help="first N training images only (quick checks)")
    p.add_argument("--no-explore", action="store_true", help="skip the best-variant search")
    p.add_argument("--variants", help="comma-separated candidate names for the best variant")
    p.add_argument("--best-from", help="reuse MODEL's selected best variant (with --no-explore)")
    p.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md")
    p.add_argument("--no-report", action="store_true", help="run the grid, skip RESULTS.md")
    p.add_argument("--results", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--docs", type=Path, default=Path("docs"))

    p = sub.add_parser("demo", help="the main job: SFW vs SGD on Fashion-MNIST, swept and plotted")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    return parser


def _train_config(args: argparse.Namespace):
    from .experiments.config import TrainConfig
    from .experiments.runner import CONFIG_FILE, read_config

    if args.config is not None:
        cfg = TrainConfig.from_json(args.config)
    elif args.resume and (args.out / CONFIG_FILE).is_file():
        cfg = read_config(args.out)
    else:
        cfg = TrainConfig()
    overrides = {f: getattr(args, f) for f in _TRAIN_FIELDS if getattr(args, f, None) is not None}
    return cfg.replace(**overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiments.runner import train_run

    cfg = _train_config(args)
    created = not args.out.exists()
    try:
        result = train_run(cfg, args.out, resume=args.resume, quiet=args.quiet)
    except (ValueError, OSError):
        # Bad input found after the run folder was made (e.g. missing data): leave no trace.
        if created and args.out.is_dir() and not any(args.out.iterdir()):
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
    from .experiments.sweep import SweepConfig, format_rows, sweep_run

    sweep = SweepConfig(
        sparsities=tuple(args.sparsities or DEFAULT_SPARSITIES), scope=args.scope,
        include=args.include, criterion=args.criterion, bn_recalibrate=args.bn_recalibrate,
        seed=args.seed,
    )  # fmt: skip
    result = sweep_run(args.run_dir, sweep, tag=args.tag)
    print(format_rows(result["rows"]))
    return 0


_DTYPES = {"float32", "float16", "bfloat16"}


def _cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from .experiments.runner import load_trained, test_loader
    from .experiments.sweep import SweepConfig, calibration_batches
    from .prune import format_report, prune_, recalibrate_bn, save_pruned, sparsity_report
    from .train import evaluate

    if args.dtype not in _DTYPES:
        raise ValueError(
            f"Invalid dtype: {args.dtype!r} (expected one of {', '.join(sorted(_DTYPES))})"
        )
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"Invalid --out: {str(args.out)!r} (folder does not exist)")
    cfg, model, data = load_trained(args.run_dir)
    device = next(model.parameters()).device
    prune_(model, args.sparsity, scope=args.scope, include=args.include)
    if args.bn_recalibrate:
        recalibrate_bn(model, calibration_batches(cfg, data, device, SweepConfig.bn_batches))
    test = evaluate(model, test_loader(cfg, data, device), precision=cfg.precision)
    save_pruned(model, args.out, dtype=getattr(torch, args.dtype))
    print(format_report(sparsity_report(model, input_shape=data.input_shape)))
    print(
        f"test accuracy at {100 * args.sparsity:g}% sparsity: {test['accuracy']:.2f}% -> wrote {args.out}"
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:

    from .experiments.plots import plot_accuracy_vs_sparsity, plot_weight_histograms
    from .experiments.runner import load_trained, read_config
    from .experiments.sweep import sweep_file_name

    labels = []
    for run_dir in args.run_dirs:
        cfg = read_config(run_dir)
        labels.append(f"{cfg.optimizer.upper()} {cfg.model}")
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({Path(d).name})" for lab, d in zip(labels, args.run_dirs)]
    if args.weights:
        models = [(lab, load_trained(d, device="cpu")[1]) for lab, d in zip(labels, args.run_dirs)]
        out = plot_weight_histograms(models, args.out)
    else:
        curves = []
        for lab, run_dir in zip(labels, args.run_dirs):
            path = Path(run_dir) / f"{sweep_file_name(args.tag)}.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"Invalid run folder: {str(run_dir)!r} (no {path.name}; run `sfwprune sweep {run_dir}` first)"
                )
            curves.append((lab, _sweep_rows(path)))
        out = plot_accuracy_vs_sparsity(curves, args.out)
    print(f"wrote {out}")
    return 0


def _sweep_rows(path: Path) -> list:
    """The ``rows`` of a sweep file; ``ValueError`` naming the file when it is not one."""
    import json

    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"Invalid sweep file: {str(path)!r} (not a sweep result: {type(exc).__name__})"
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"Invalid sweep file: {str(path)!r} (its rows are not a list of rows)")
    return rows


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import DEMO_EPOCHS, run_demo

    epochs = DEMO_EPOCHS if args.epochs is None else args.epochs
    if epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (expected an integer >= 1)")
    run_demo(args.out, epochs=epochs, data_dir=args.data_dir, quiet=args.quiet)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.report import write_report
    from .experiments.reproduce import ReproduceConfig, run_reproduce

    if not args.report_only:
        rc = ReproduceConfig(
            dataset=args.dataset, models=tuple(m for m in args.models.split(",") if m),
            seeds=args.seeds, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
            data_dir=args.data_dir, device=args.device, jobs=args.jobs,
            explore=not args.no_explore, limit=args.limit, best_from=args.best_from,
            **({"variants": tuple(args.variants.split(","))} if args.variants else {}),
        )  # fmt: skip
        run_reproduce(rc, args.out, log=(lambda s: None) if args.quiet else print)
    if not args.no_report:
        path = write_report(args.out, args.results, args.docs)
        print(f"wrote {path}")
    return 0


_COMMANDS = {
    "train": _cmd_train, "sweep": _cmd_sweep, "prune": _cmd_prune, "plot": _cmd_plot,
    "demo": _cmd_demo, "reproduce": _cmd_reproduce,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 training failure)."""
    try:
        args = build_parser().parse_args(argv)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"Invalid --threads: {args.threads} (expected an integer >= 1)")
            import torch

            torch.set_num_threads(args.threads)
        return _COMMANDS[args.command](args)
    except (CLIError, ValueError, OSError) as exc:  # OSError: unwritable path, disk full ...
        print(_one_line(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
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
