"""The reproduction grid on tiny synthetic data: every method's files, selection, the report."""

from __future__ import annotations

import json

import pytest

from sfwprune.experiments.provenance import git_revision
from sfwprune.experiments.report import write_report
from sfwprune.experiments.reproduce import ReproduceConfig, grid_revisions, run_reproduce


def test_grid_runs_selects_and_reports(tmp_path) -> None:
    out = tmp_path / "grid"
    rc = ReproduceConfig(
        dataset="synthetic", models=("lenet300",), seeds=2, epochs=1, limit=128,
        sparsities=(0.0, 0.5, 0.9), finetune_epochs=1, variants=("kf0.1_v15",), jobs=1,
    )  # fmt: skip
    log: list[str] = []
    run_reproduce(rc, out, log=log.append)
    model = out / "lenet300"
    for method in ("sgd", "sfw", "sfw_init", "sfw_ksupport", "cram", "acdc", "sfw_cram"):
        for seed in (0, 1):
            run = model / method / f"seed{seed}"
            assert (run / "summary.json").is_file() and (run / "sweep-layer.json").is_file()
            recon = json.loads((run / "sweep-recon.json").read_text())
            assert recon["config"]["sweep"]["reconstruct"] is True
            assert recon["config"]["sweep"]["gradual"] is True  # the grid's levels, one schedule
            assert recon["config"]["sweep"]["calibration_size"] == 2048
            assert all(r["seconds"] > 0 for r in recon["rows"])
    for tag in ("random", "wanda", "wanda-recon"):
        assert (model / "sgd" / "seed0" / f"sweep-{tag}.json").is_file()
    cram = json.loads((model / "cram" / "seed0" / "config.json").read_text())["config"]
    assert cram["optimizer"]["cram"] == "cram+" and cram["optimizer"]["name"] == "sgd"
    ft_path = model / "sgd_finetune" / "seed1.json"
    ft = json.loads(ft_path.read_text())
    assert [r["sparsity"] for r in ft["rows"]] == [0.0, 0.5, 0.9]
    assert all(r["retrain_seconds"] > 0 for r in ft["rows"])
    assert abs(ft["rows"][2]["measured_sparsity"] - 0.9) < 1e-3
    best = json.loads((model / "best.json").read_text())
    assert best["variant"] in ("sfw", "kf0.1_v15") and best["scope"] in ("global", "layer")
    assert best["recon"]["variant"] in ("sfw", "kf0.1_v15") and best["recon"]["scope"] == "recon"
    assert len(best["candidates"]) == 6  # 2 variants x (global, layer, recon)
    if best["variant"] != "sfw":
        assert (model / "sfw_best" / "seed1" / "summary.json").is_file()
    init = json.loads((model / "sfw_init" / "seed0" / "summary.json").read_text())["sfw_init"]
    assert init["iters"] >= 1 and init["seconds"] > 0

    # resumable: a second call finds everything done and trains nothing
    summary_mtime = (model / "sfw" / "seed0" / "summary.json").stat().st_mtime
    sweep_mtime = (model / "sfw" / "seed0" / "sweep.json").stat().st_mtime
    run_reproduce(rc, out, log=log.append)
    assert (model / "sfw" / "seed0" / "sweep.json").stat().st_mtime == sweep_mtime
    assert (model / "sfw" / "seed0" / "summary.json").stat().st_mtime == summary_mtime

    # every results file carries the revision this process started with
    assert list(grid_revisions(out)) == [git_revision()]
    assert all(
        json.loads(p.read_text())["provenance"]["git_revision"] == git_revision()
        for p in [model / "best.json", model / "reproduce_config.json", ft_path]
    )

    results = write_report(out, tmp_path / "RESULTS.md", tmp_path / "docs")
    text = results.read_text()
    assert f"`{git_revision()}`" in text and "Code revision(s) behind these numbers (1;" in text
    for label in ("1. SGD + magnitude", "3. SGD + magnitude + fine-tune",
                  "4. SGD + magnitude + reconstruction", "8. SFW + reconstruction",
                  "13. SFW, K-support ball, weights only", "14. CrAM+", "16. AC/DC",
                  "18. SFW fed the CrAM+ gradient", "How it was measured",
                  "Best row per sparsity", "reaching the top level costs"):  # fmt: skip
        assert label in text
    assert (tmp_path / "docs" / "repro_lenet300.png").is_file()
    assert (tmp_path / "docs" / "weights_lenet300.png").is_file()


def test_grid_jobs_on_a_process_pool_follow_their_dependencies() -> None:
    import concurrent.futures as cf
    import multiprocessing
    import operator

    from sfwprune.experiments.reproduce import _Grid

    log: list[str] = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        grid = _Grid(pool, git_revision(), False, log.append)
        grid.submit("a", operator.add, 1, 2,
                    then=lambda: grid.submit("c", operator.mul, 2, 3))  # fmt: skip
        grid.submit("b", operator.add, 3, 4)
        grid.wait()
    keys = [line.split()[1] for line in log]
    assert sorted(keys) == ["a", "b", "c"] and keys.index("c") > keys.index("a")


def test_a_finished_run_of_another_config_is_refused_not_reused(tmp_path) -> None:
    from sfwprune.experiments.reproduce import SWEEPS, train_and_sweep

    rc = ReproduceConfig(dataset="synthetic", models=("lenet300",), epochs=1, limit=64)
    run = tmp_path / "sfw_best" / "seed0"
    first = rc.train_config("lenet300", {"optimizer": "sfw", "k_frac": 0.1}, 0)
    sweeps = {None: SWEEPS[None]}
    train_and_sweep(first.to_dict(), str(run), [0.0, 0.5], sweeps)
    files = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    train_and_sweep(first.to_dict(), str(run), [0.0, 0.5], sweeps)  # same config: reused as is
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files
    other = rc.train_config("lenet300", {"optimizer": "sfw", "k_frac": 0.01}, 0)
    with pytest.raises(ValueError, match="holds a finished run of another config"):
        train_and_sweep(other.to_dict(), str(run), [0.0, 0.5], sweeps)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files


def test_a_sweep_file_of_another_sweep_is_refused_not_reused(tmp_path) -> None:
    import json

    from sfwprune.experiments.reproduce import sweeps_of, train_and_sweep

    rc = ReproduceConfig(dataset="synthetic", models=("lenet300",), epochs=1, limit=64)
    run = tmp_path / "sgd" / "seed0"
    cfg = rc.train_config("lenet300", {"optimizer": "sgd"}, 0).to_dict()
    plain = {"recon": {"reconstruct": True}}
    train_and_sweep(cfg, str(run), [0.0, 0.5], plain, calibration_size=32)
    path = run / "sweep-recon.json"
    record = json.loads(path.read_text())
    del record["config"]["sweep"]["relu_aware"]  # a file from before the field: its default
    path.write_text(json.dumps(record))
    files = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    train_and_sweep(cfg, str(run), [0.0, 0.5], plain, calibration_size=32)  # the same sweep
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files
    aware = {"recon": {"reconstruct": True, "relu_aware": True}}
    with pytest.raises(ValueError, match=r"holds another sweep \(relu_aware: False, this grid"):
        train_and_sweep(cfg, str(run), [0.0, 0.5], aware, calibration_size=32)
    with pytest.raises(ValueError, match=r"holds another sweep \(calibration_size: 32"):
        train_and_sweep(cfg, str(run), [0.0, 0.5], plain)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files
    # the grid's own sweeps: LeNet-5's reconstructing sweeps are ReLU-aware, LeNet-300-100's not
    assert sweeps_of("lenet5", True)["wanda-recon"]["relu_aware"] is True
    assert "relu_aware" not in sweeps_of("lenet300", True)["recon"]
    assert "relu_aware" not in sweeps_of("lenet5", False)[None]
