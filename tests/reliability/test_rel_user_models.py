"""User models through the whole library: torchvision's ResNet-18, Conv1d + BatchNorm1d, tied
weights, Embedding, MultiheadAttention, a TransformerEncoderLayer and LayerNorm each go through
constraint_groups, SFW, prune_, sparsity_sweep, sparsity_report, save_pruned/load_pruned,
to_sparse_inference and recalibrate_bn. What is constrained and what is pruned is one set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune import SFW
from sfwprune.constraints import constraint_groups
from sfwprune.params import weight_parameters
from sfwprune.prune import (
    load_pruned,
    prune_,
    recalibrate_bn,
    save_pruned,
    sparsity_report,
    sparsity_sweep,
    to_sparse_inference,
)
from sfwprune.prune.masks import prunable_parameters

VOCAB, CLASSES = 40, 5


class TiedLM(nn.Module):
    """Embedding and output layer share one matrix (as in many language models)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.decoder = nn.Linear(16, VOCAB)
        self.decoder.weight = self.embed.weight

    def forward(self, ids):
        return self.decoder(self.norm(self.embed(ids)).mean(dim=1))[:, :CLASSES]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, CLASSES)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(dim=1))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.layer = nn.TransformerEncoderLayer(
            32, 4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, ids):
        return self.head(self.norm(self.layer(self.embed(ids))).mean(dim=1))


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=CLASSES)


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 16, 3),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 30, CLASSES),
    )


# name -> (factory, input maker (batch, generator) -> tensor)
MODELS = {
    "resnet18": (_resnet18, lambda n, g: torch.randn(n, 3, 32, 32, generator=g)),
    "conv1d_bn1d": (_conv1d, lambda n, g: torch.randn(n, 4, 32, generator=g)),
    "tied": (TiedLM, lambda n, g: torch.randint(0, VOCAB, (n, 7), generator=g)),
    "attention": (Attention, lambda n, g: torch.randint(0, VOCAB, (n, 7), generator=g)),
    "transformer": (Transformer, lambda n, g: torch.randint(0, VOCAB, (n, 7), generator=g)),
}


def _make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    factory, inputs = MODELS[name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return factory(), inputs(8, g), torch.randint(0, CLASSES, (8,), generator=g)


def _weight_sparsity(model: nn.Module) -> float:
    weights = [p for _, p in weight_parameters(model)]
    return 1 - sum(int(p.count_nonzero()) for p in weights) / sum(p.numel() for p in weights)


@pytest.fixture(params=list(MODELS))
def case(request):
    return request.param, *_make(request.param)


def test_constrained_set_is_the_pruned_set(case):
    name, model, _, _ = case
    groups = constraint_groups(model, "k_sparse", include="weights", k_frac=0.1)
    constrained = {g["name"] for g in groups if g["constraint"] != "unconstrained"}
    pruned = {n for n, _ in prunable_parameters(model, "weights")}
    assert constrained == pruned == {n for n, _ in weight_parameters(model)}
    if name in ("tied", "attention", "transformer"):
        assert "embed.weight" in pruned  # embeddings are weights (tied: once, first name)
    if name in ("attention", "transformer"):
        assert any(n.endswith("in_proj_weight") for n in pruned)
    assert not any(n.endswith("bias") or ".norm" in n or n.startswith("norm") for n in pruned)


def test_sfw_steps(case):
    _, model, x, y = case
    opt = SFW(constraint_groups(model, "k_sparse", include="weights", k_frac=0.1), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_prune_reaches_the_target_on_every_weight(case):
    name, model, _, _ = case
    prune_(model, 0.9)
    assert _weight_sparsity(model) == pytest.approx(0.9, abs=1e-3)  # within one element
    if name in ("attention", "transformer"):
        assert float((model.embed.weight == 0).float().mean()) > 0.1  # pruned, not skipped
        attn = model.attn if name == "attention" else model.layer.self_attn
        assert float((attn.in_proj_weight == 0).float().mean()) > 0.1


def test_sparsity_sweep_restores_the_model(case):
    _, model, x, y = case
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            out = m(x)
        return {"accuracy": float((out.argmax(1) == y).float().mean()), "loss": 0.0}

    rows = sparsity_sweep(model, evaluate, [0.0, 0.5, 0.9])
    assert [round(r["measured_sparsity"], 3) for r in rows] == [0.0, 0.5, 0.9]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_sparsity_report(case):
    _, model, x, _ = case
    prune_(model, 0.5)
    report = sparsity_report(model, example_input=x)
    prunable = {r["name"] for r in report["layers"] if r["prunable"]}
    assert prunable == {n for n, _ in weight_parameters(model)}
    t = report["totals"]
    assert t["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < t["nonzero_macs"] < t["macs"]


def test_save_and_load_pruned(case, tmp_path):
    name, model, x, _ = case
    prune_(model, 0.95)
    path = save_pruned(model, tmp_path / "m.pruned.pt")
    fresh = _make(name, seed=1)[0]
    load_pruned(path, fresh)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    if name == "tied":
        assert fresh.decoder.weight is fresh.embed.weight


def test_to_sparse_inference_runs_and_matches(case):
    _, model, x, _ = case
    prune_(model, 0.95)
    fast = to_sparse_inference(model, min_sparsity=0.5, min_numel=0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_recalibrate_bn(case):
    name, model, x, _ = case
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    used = recalibrate_bn(model, [x, x.flip(0)])
    assert used == (2 if bns else 0)
    if bns:
        assert not torch.equal(bns[0].running_mean, torch.zeros_like(bns[0].running_mean))
        assert name in ("resnet18", "conv1d_bn1d")
