"""``measure_latency``: wall-clock and thread CPU-time medians, interleaved, checked inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sfwprune.experiments.structured import (
    RUNTIMES,
    _cpu_speedup,
    _model_section,
    deploy,
    latency_levels,
    measure_latency,
)
from sfwprune.models import build_model
from sfwprune.prune.shrink import shrink
from sfwprune.prune.structured import structured_masks


def _mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), *[nn.Linear(width, width) for _ in range(depth)])


def test_measure_latency_fields_and_ordering() -> None:
    models = {"big": _mlp(256, 12), "small": _mlp(256, 1)}
    out = measure_latency(models, (256,), batch=64, rounds=15)
    assert set(out) == {"big", "small"}
    for v in out.values():
        assert set(v) == {"median_ms", "speedup", "cpu_median_ms", "cpu_speedup", "rounds"}
        assert v["rounds"] == 15 and v["median_ms"] > 0 and v["cpu_median_ms"] > 0
    assert out["big"]["speedup"] == 1.0 and out["big"]["cpu_speedup"] == 1.0
    # 12 layers against 1: the smaller model is faster by both clocks, by a wide margin
    assert out["small"]["speedup"] > 3 and out["small"]["cpu_speedup"] > 3
    # one thread: the thread's CPU time cannot exceed the wall time by more than clock noise
    for v in out.values():
        assert v["cpu_median_ms"] <= 1.2 * v["median_ms"] + 0.05


@pytest.mark.parametrize(
    "kwargs, name",
    [({"batch": 0}, "batch"), ({"batch": 1.5}, "batch"), ({"rounds": 0}, "rounds"),
     ({"rounds": True}, "rounds")],
)  # fmt: skip
def test_measure_latency_rejects_bad_input(kwargs, name) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        measure_latency({"m": _mlp(4, 1)}, (4,), **kwargs)
    with pytest.raises(ValueError, match="Invalid models"):
        measure_latency({}, (4,))


@pytest.mark.parametrize("runtime", ["jit", "jit-optimized"])
def test_deployed_models_equal_eager(runtime) -> None:
    """LeNet-5 and its 50%-channel shrink: each runtime gives the eager outputs, at the traced
    batch size; the original model is untouched and stays usable."""
    dense = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10, seed=0).eval()
    small = shrink(dense, structured_masks(dense, 0.5, "channel", scope="layer")).eval()
    torch.manual_seed(1)
    x = torch.randn(8, 1, 28, 28)
    for model in (dense, small):
        with torch.no_grad():
            want = model(x)
        fast = deploy(model, x, runtime)
        assert fast is not model and not isinstance(model, torch.jit.ScriptModule)
        with torch.inference_mode():
            got = fast(x)
            again = fast(torch.zeros_like(x))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, model(torch.zeros_like(x)), rtol=1e-5, atol=1e-5)
    assert deploy(dense, x, "eager") is dense


def test_measure_latency_runtimes_and_bad_runtime(tmp_path) -> None:
    models = {"big": _mlp(64, 6), "small": _mlp(64, 1)}
    for runtime in RUNTIMES:
        out = measure_latency(models, (64,), batch=4, rounds=3, runtime=runtime)
        assert set(out) == {"big", "small"} and out["big"]["speedup"] == 1.0
        assert all(v["rounds"] == 3 and v["median_ms"] > 0 for v in out.values())
    for bad in ("compile", "JIT", "", None):
        with pytest.raises(
            ValueError, match=f"Invalid runtime: {bad!r}.*eager, jit, jit-optimized"
        ):
            measure_latency(models, (64,), runtime=bad)
        with pytest.raises(ValueError, match="Invalid runtime"):
            deploy(models["big"], torch.zeros(1, 64), bad)
    # the grid's entry point refuses it before reading the run folder
    with pytest.raises(ValueError, match="Invalid runtime: 'torchscript'"):
        latency_levels(tmp_path / "no-run", tmp_path / "latency.json", runtime="torchscript")


def test_report_shows_cpu_speedups_and_na_for_old_files(tmp_path) -> None:
    row = {"sparsity": 0.5, "params": 10, "batch1_ms": 0.2, "batch1_speedup": 1.1,
           "batch256_ms": 8.0, "batch256_speedup": 1.4}  # fmt: skip
    assert _cpu_speedup(row, 1) == "n/a"
    assert _cpu_speedup({**row, "batch1_cpu_speedup": math.nan}, 1) == "n/a"
    assert _cpu_speedup({**row, "batch256_cpu_speedup": 1.734}, 256) == "1.73x"
    (tmp_path / "lenet5").mkdir()
    dense = {**row, "sparsity": 0.0, "batch1_speedup": 1.0, "batch256_speedup": 1.0,
             "batch1_cpu_speedup": 1.0, "batch256_cpu_speedup": 1.0}  # fmt: skip
    half = {**row, "batch1_cpu_speedup": 1.17, "batch256_cpu_speedup": 1.66}
    (tmp_path / "lenet5" / "latency.json").write_text(
        json.dumps({"rounds": {"1": 3, "256": 2}, "rows": [dense, half]})
    )
    lines, found = _model_section(tmp_path, "lenet5", 1)
    text = "\n".join(lines)
    assert "CPU-time speed-up" in text
    assert "1 thread, eager runtime" in text  # files written before the runtime was recorded
    assert "| 50% | 10 | 0.200 | 1.10x | 1.17x | 8.00 | 1.40x | 1.66x |" in text
    assert found["latency"]["rows"][1]["batch256_cpu_speedup"] == 1.66
