"""Non-finite loss or gradients: training stops with a clear message naming the epoch and step,
the last good checkpoint stays intact, and no NaN reaches the weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sfwprune import train
from sfwprune.cli import main
from sfwprune.constraints import constraint_from_group
from sfwprune.experiments import runner
from sfwprune.experiments.runner import CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE
from sfwprune.models import build_model
from sfwprune.optim import SFW
from sfwprune.train import NonFiniteLossError, OptimizerSpec, build_optimizer, train_epoch

FLAGS = ["--dataset", "synthetic", "--model", "lenet300", "--limit", "256", "--batch-size", "32"]


def _poison(batches, at_step: int):
    """The batches, with the inputs of step ``at_step`` (1-based) set to NaN."""
    for step, (x, y) in enumerate(batches, start=1):
        yield (torch.full_like(x, math.nan) if step == at_step else x), y


def test_nan_loss_mid_run_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_train_epoch = train.train_epoch  # the runner trains through train.fit
    saved = {}

    def epoch_2_goes_nan(model, batches, *args, epoch=0, **kwargs):
        if epoch == 1:  # epoch 2: the checkpoint of epoch 1 is on disk now
            saved["bytes"] = (run / CHECKPOINT_FILE).read_bytes()
            saved["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
            batches = _poison(batches, at_step=3)
        return real_train_epoch(model, batches, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train, "train_epoch", epoch_2_goes_nan)
    code = main(["--quiet", "train", *FLAGS, "--epochs", "3", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert "Non-finite loss" in err and "epoch 2, step 3" in err

    # the last good checkpoint: byte for byte the one of epoch 1, loadable, finite
    assert (run / CHECKPOINT_FILE).read_bytes() == saved["bytes"]
    ckpt = runner.load_checkpoint(run)
    assert ckpt["epoch"] == 1
    for name, tensor in ckpt["model"].items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, saved["weights"][name]), name
    _, model, _ = runner.load_trained(run, device="cpu", allow_partial=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len((run / METRICS_FILE).read_text().splitlines()) == 1
    assert not (run / SUMMARY_FILE).exists()


def test_diverging_sgd_stops_with_one_line_naming_the_step(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["--quiet", "train", *FLAGS, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30",
            "--momentum", "0", "--out", str(run)]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "Non-finite loss" in err and "epoch 1, step " in err
    assert not (run / CHECKPOINT_FILE).exists()  # no epoch finished: nothing to save


def _tiny_model() -> nn.Module:
    return build_model("lenet300", input_shape=(1, 8, 8), num_classes=10, seed=0)


def _batches(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sfw", "sgd"])
def test_train_epoch_stops_before_a_nan_loss_step(optimizer) -> None:
    model = _tiny_model()
    opt = build_optimizer(model, OptimizerSpec(optimizer))
    before_bad = {}

    def remember(step, loss) -> None:
        if step == 1:  # after step 2 (0-based 1): the weights step 3 must not change
            before_bad.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss \(nan\) at epoch 4, step 3"):
        train_epoch(model, _poison(_batches(), at_step=3), opt, epoch=3, on_batch=remember)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_bad[name]), name


class _NaNGradient(nn.Module):
    """A model whose loss is finite but whose gradient is NaN: ``0·sqrt(z)`` at ``z = 0``
    (forward 0, backward ``0·inf = nan``) — what an overflow inside a layer looks like."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.z = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.fc(x.flatten(1)) + 0.0 * torch.sqrt(self.z)


@pytest.mark.parametrize("optimizer", ["sfw", "sgd"])
def test_nan_gradient_with_finite_loss_stops_before_the_step(optimizer) -> None:
    model = _NaNGradient()
    opt = build_optimizer(model, OptimizerSpec(optimizer))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"epoch 1, step 1\b"):
        train_epoch(model, _batches(), opt)
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, start[name]), name


# --- the SFW step itself ----------------------------------------------------------------------

KINDS = {
    "k_sparse": {"k": 3, "radius": 1.0},
    "k_support": {"k": 3, "radius": 1.0},
    "l1": {"radius": 1.0},
    "l2": {"radius": 1.0},
    "linf": {"radius": 1.0},
    "lp": {"p": 3.0, "radius": 1.0},
    "unconstrained": {},
}


def _sfw_param(kind: str, n: int, dtype: torch.dtype, foreach: bool | None):
    w = nn.Parameter(torch.full((n,), 0.001, dtype=dtype))
    group = {"params": [w], "constraint": kind, **KINDS[kind]}
    return w, SFW([group], lr=1.0, momentum=0.9, foreach=foreach), group


@pytest.mark.parametrize("foreach", [None, False], ids=["fast", "reference"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sfw_huge_finite_gradients_keep_weights_finite_and_inside(kind, foreach) -> None:
    for dtype, big in ((torch.float32, 1e30), (torch.float64, 1e300)):
        for n in (10, 40000):  # small tensors and the large-tensor (NumPy top-K) path
            w, opt, group = _sfw_param(kind, n, dtype, foreach)
            gen = torch.Generator().manual_seed(n)
            w.grad = torch.randn(n, dtype=dtype, generator=gen) * big
            opt.step()
            assert torch.isfinite(w).all(), (dtype, n)
            if kind != "unconstrained":
                # in float64: a float32 norm of 40000 entries is itself off by ~1e-6
                inside = constraint_from_group(group, n).contains(w.detach().double(), atol=1e-5)
                assert inside, (dtype, n)


_SFW_CASES = [
    pytest.param(
        kind, foreach, bad,
        id=f"{kind}-{'reference' if foreach is False else 'fast'}-{bad}",
    )
    for kind in sorted(KINDS)
    for foreach in (None, False)
    for bad in ("nan", "inf")
]  # fmt: skip


@pytest.mark.parametrize("kind, foreach, bad", _SFW_CASES)
def test_sfw_step_never_writes_nan_into_the_weights(kind, foreach, bad) -> None:
    w, opt, _ = _sfw_param(kind, 10, torch.float64, foreach)
    w.grad = torch.ones(10, dtype=torch.float64)
    w.grad[2] = float(bad)
    before = w.detach().clone()
    try:
        opt.step()
    except (ValueError, RuntimeError):
        pass  # refusing the step is fine; writing NaN is not
    assert torch.isfinite(w).all()
    # and the optimizer is not poisoned: a good gradient afterwards gives a finite step
    w.grad = torch.ones(10, dtype=torch.float64)
    opt.step()
    assert torch.isfinite(w).all()
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize(
    "kind, foreach",
    [
        pytest.param(
            kind, foreach, id=f"{kind}-{'reference' if foreach is False else 'fast'}",
        )
        for kind in sorted(KINDS)
        for foreach in (None, False)
    ],
)  # fmt: skip
def test_sfw_zero_gradient_keeps_weights_finite(kind, foreach) -> None:
    # a dead unit or an unused layer: its gradient is exactly zero this step
    w = nn.Parameter(torch.full((10,), 0.1))
    kw = {**KINDS[kind], "radius": 8.0} if "radius" in KINDS[kind] else {}
    opt = SFW([{"params": [w], "constraint": kind, **kw}], lr=0.5, momentum=0.9, foreach=foreach)
    for _ in range(2):
        w.grad = torch.zeros(10)
        opt.step()
        assert torch.isfinite(w).all(), w
