"""The pruning API on a CUDA model: same masks as on CPU, device kept (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfwprune.prune import (
    Ranking,
    SparseLinear,
    load_pruned,
    prune_,
    recalibrate_bn,
    save_pruned,
    sparsity_report,
    sparsity_sweep,
    to_sparse_inference,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_cuda_masks_equal_cpu_masks(make_lenet300, scope, criterion):
    cpu, gpu = make_lenet300(), make_lenet300().to(CUDA)
    kw = {"scope": scope, "criterion": criterion}
    want = prune_(cpu, 0.93, generator=torch.Generator().manual_seed(0), **kw)
    got = prune_(gpu, 0.93, generator=torch.Generator().manual_seed(0), **kw)
    for k in want:
        assert got[k].device.type == "cuda" and torch.equal(got[k].cpu(), want[k]), k
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert torch.equal(a, b.cpu())
    ranking = Ranking(make_lenet300().to(CUDA), **kw, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(ranking.masks(0.93)[k], got[k]) for k in got)


def test_cuda_sweep_restores_and_recalibrates_with_cpu_batches(make_convbn):
    model = make_convbn().to(CUDA)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]  # on CPU: moved to the model
    x = torch.randn(16, 3, 8, 8, device=CUDA)

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            out = m(x)
        return {"accuracy": 0.0, "loss": out.square().mean().item()}

    rows = sparsity_sweep(model, evaluate, [0.5, 0.9], bn_batches=batches)
    assert len(rows) == 2
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert recalibrate_bn(model, batches) == 2


def test_cuda_report_export_and_sparse_inference(tmp_path, make_lenet300):
    model = make_lenet300().to(CUDA)
    prune_(model, 0.98)
    t = sparsity_report(model, input_shape=(1, 28, 28))["totals"]
    assert t["weight_nonzero"] == round(0.02 * 266_200)
    cpu = load_pruned(save_pruned(model, tmp_path / "m.pt"), make_lenet300(seed=1))
    for a, b in zip(model.parameters(), cpu.parameters(), strict=True):
        assert torch.equal(a.cpu(), b)
    fast = to_sparse_inference(model, min_sparsity=0.0, min_numel=0)
    assert isinstance(fast[1], SparseLinear) and fast[1].weight.device.type == "cuda"
    x = torch.randn(64, 1, 28, 28, device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    moved = copy.deepcopy(fast).to("cpu")
    with torch.no_grad():
        torch.testing.assert_close(moved(x.cpu()), model(x).cpu(), rtol=1e-4, atol=1e-4)


def test_cuda_export_keeps_model_on_device(tmp_path, make_convbn):
    model = make_convbn().to(CUDA)
    prune_(model, 0.5)
    other = make_convbn(seed=3).to(CUDA)
    load_pruned(save_pruned(model, tmp_path / "m.pt", dtype=torch.float16), other)
    assert all(p.device.type == "cuda" for p in other.parameters())
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a.half().float(), b)
    assert isinstance(other[0], nn.Conv2d)
