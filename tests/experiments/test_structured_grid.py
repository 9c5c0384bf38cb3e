"""The structured grid (issue 14) on tiny synthetic data: files, latency, report, figure, CLI."""

from __future__ import annotations

import json

from sfwprune.cli import main
from sfwprune.experiments.structured import (
    CHANNEL_SPARSITIES,
    METHODS,
    SWEEPS,
    StructuredConfig,
    run_structured,
    write_structured_report,
)


def test_structured_grid_files_and_report(tmp_path) -> None:
    out = tmp_path / "grid"
    sc = StructuredConfig(dataset="synthetic", models=("lenet300", "lenet5"), seeds=1, epochs=1, limit=128,
                          calibration_size=64)  # fmt: skip
    log: list[str] = []
    run_structured(sc, out, log=log.append)
    model = out / "lenet5"
    for method in METHODS:
        run = model / method / "seed0"
        assert (run / "summary.json").is_file()
        for tag, fields in SWEEPS.items():
            result = json.loads((run / f"sweep-{tag}.json").read_text())
            assert [r["sparsity"] for r in result["rows"]] == fields["sparsities"]
            assert result["config"]["sweep"]["structure"] == fields["structure"]
    cfg = json.loads((model / "sfw_2of4" / "seed0" / "config.json").read_text())["config"]
    assert cfg["optimizer"]["constraint"] == "n_m" and cfg["optimizer"]["nm_m"] == 4
    cfg = json.loads((model / "sfw_channel" / "seed0" / "config.json").read_text())["config"]
    assert cfg["optimizer"]["constraint"] == "channel" and cfg["optimizer"]["k_frac"] == 0.25
    latency = json.loads((model / "latency.json").read_text())
    assert [r["sparsity"] for r in latency["rows"]] == list(CHANNEL_SPARSITIES)
    params = [r["params"] for r in latency["rows"]]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    assert all(r["batch1_ms"] > 0 and r["batch256_ms"] > 0 for r in latency["rows"])
    assert latency["rows"][0]["batch1_speedup"] == 1.0

    # resumable: nothing is trained, swept or timed again
    mtime = (model / "sgd" / "seed0" / "sweep-ch-l1-recon.json").stat().st_mtime
    lat_mtime = (model / "latency.json").stat().st_mtime
    run_structured(sc, out, log=log.append)
    assert (model / "sgd" / "seed0" / "sweep-ch-l1-recon.json").stat().st_mtime == mtime
    assert (model / "latency.json").stat().st_mtime == lat_mtime

    results, docs = tmp_path / "RESULTS-structured.md", tmp_path / "docs"
    write_structured_report(out, results, docs)
    text = results.read_text()
    for needle in ("## Targets of issue 14", "SGD + L1 filter pruning (Li et al. 2017)",
                   "SFW-channel + L2 + reconstruction", "SFW-2:4", "batch 256 (ms)",
                   "target >= 1.6x", "target <= 0.5", "![accuracy vs CPU latency]"):  # fmt: skip
        assert needle in text, needle
    assert " ± " in text and "n/a" not in text.split("## Tables")[1].split("## Provenance")[0]
    assert (docs / "structured_accuracy_latency.png").stat().st_size > 0


def test_reproduce_structured_cli_report_only(tmp_path, capsys) -> None:
    assert main(["reproduce", "fashion-mnist", "--structured", "--report-only",
                 "--out", str(tmp_path / "none")]) == 2  # fmt: skip
    assert "run `sfwprune reproduce fashion-mnist --structured` first" in capsys.readouterr().err
    assert main(["reproduce", "fashion-mnist", "--structured", "--variants", "x",
                 "--out", str(tmp_path / "none")]) == 2  # fmt: skip
    assert "not used by --structured" in capsys.readouterr().err
