"""sfwprune.distributed in one process: environment, devices, batch split, shards, bf16 and
channels_last with SFW. The multi-process behaviour is in test_ddp.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sfwprune.distributed import (
    DistContext,
    env_ranks,
    init_distributed,
    local_batch_size,
    rank_device,
    unwrap,
)
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import (
    load_data,
    make_model,
    train_loader,
    train_run,
    use_channels_last,
)
from sfwprune.train import build_optimizer, train_epoch

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CFG = TrainConfig(
    dataset="synthetic", model="lenet5", batch_size=16, limit=64, augment=True, device="cpu"
)


@pytest.fixture
def no_torchrun(monkeypatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_ranks_reads_torchrun_variables(no_torchrun) -> None:
    assert env_ranks() == (0, 1, 0)
    no_torchrun.setenv("RANK", "3")
    no_torchrun.setenv("WORLD_SIZE", "4")
    no_torchrun.setenv("LOCAL_RANK", "1")
    assert env_ranks() == (3, 4, 1)


@pytest.mark.parametrize(
    ("env", "named"),
    [({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2")],
)
def test_env_ranks_rejects_bad_values(no_torchrun, env, named) -> None:
    for key, value in env.items():
        no_torchrun.setenv(key, value)
    with pytest.raises(ValueError, match=named):
        env_ranks()


def test_rank_device() -> None:
    assert rank_device("cpu", local_rank=1, world_size=2) == torch.device("cpu")
    if torch.cuda.is_available():
        assert rank_device("cuda", local_rank=0, world_size=2) == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
            rank_device("cuda:0", local_rank=0, world_size=2)
    else:
        assert rank_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            rank_device("cuda", local_rank=0, world_size=2)


def test_local_batch_size_splits_the_global_batch() -> None:
    assert local_batch_size(128, 1) == 128 and local_batch_size(128, 4) == 32
    with pytest.raises(ValueError, match=r"Invalid batch_size: 10 .*multiple of 4"):
        local_batch_size(10, 4)


def test_rank_batches_are_interleaved_parts_of_the_global_batches() -> None:
    data = load_data(CFG)
    single = list(train_loader(CFG, data, "cpu"))
    shards = [list(train_loader(CFG, data, "cpu", rank=r, world_size=2)) for r in (0, 1)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 4
    for b, (x, y) in enumerate(single):
        for r in (0, 1):
            xr, yr = shards[r][b]
            assert xr.shape[0] == 8  # batch_size 16 over 2 ranks
            assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])  # same crops too


def test_one_process_needs_no_process_group(no_torchrun) -> None:
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend) == (0, 1, True, None)
    assert not (dist.is_available() and dist.is_initialized())
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model and unwrap(model) is model
    assert ctx.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert ctx.mean({"loss": 0.1, "accuracy": 30.0}, 7) == {"loss": 0.1, "accuracy": 30.0}
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    assert ctx.main_only(lambda: 7) == 7 and ctx.main_first(lambda: 8) == 8
    ctx.barrier()
    ctx.sync_buffers_(model)
    with pytest.raises(ValueError, match="bad"):
        ctx.main_only(lambda: (_ for _ in ()).throw(ValueError("bad")))


def test_world_size_without_rendezvous_address_is_refused(no_torchrun) -> None:
    no_torchrun.setenv("WORLD_SIZE", "2")
    no_torchrun.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu")
    assert not (dist.is_available() and dist.is_initialized())


def test_channels_last_only_for_conv_models_on_cuda() -> None:
    data = load_data(CFG)
    conv = make_model(CFG, data, torch.device("cpu"))
    mlp = make_model(CFG.replace(model="lenet300"), data, torch.device("cpu"))
    assert use_channels_last(conv, torch.device("cuda")) and not use_channels_last(
        mlp, torch.device("cuda")
    )
    assert not use_channels_last(conv, torch.device("cpu"))


def _sfw_steps(
    channels_last: bool, precision: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    data = load_data(CFG)
    model = make_model(CFG, data, torch.device("cpu"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, CFG.optimizer)
    loader = train_loader(CFG, data, "cpu", channels_last=channels_last)
    train_epoch(model, loader, optimizer, precision=precision)
    return model, optimizer


def test_bf16_and_channels_last_keep_sfw_state_fp32() -> None:
    model, optimizer = _sfw_steps(channels_last=True, precision="bf16")
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in model.parameters())


def test_channels_last_steps_like_contiguous() -> None:
    (a, _), (b, _) = (_sfw_steps(cl, "fp32") for cl in (True, False))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def test_context_describes_itself() -> None:
    ctx = DistContext(rank=1, world_size=2, local_rank=1, backend="gloo")
    assert ctx.describe() == {"world_size": 2, "backend": "gloo"}
    assert ctx.is_distributed and not ctx.is_main


def test_progress_bars_do_not_change_the_data_order(tmp_path) -> None:
    # Under torchrun only rank 0 shows them: a bar that drew an extra epoch plan would give
    # rank 0 another permutation than the other ranks.
    cfg = CFG.replace(model="lenet300", epochs=2)
    quiet = train_run(cfg, tmp_path / "quiet", quiet=True)
    shown = train_run(cfg, tmp_path / "bars", quiet=False, log=lambda _: None)
    assert [m["train_loss"] for m in quiet.metrics] == [m["train_loss"] for m in shown.metrics]
    for a, b in zip(quiet.model.parameters(), shown.model.parameters()):
        assert torch.equal(a, b)
