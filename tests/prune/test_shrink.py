"""shrink: the smaller dense model computes what the masked model computes (eval mode)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfwprune.models import build_model
from sfwprune.prune.masks import apply_masks_
from sfwprune.prune.shrink import resize_, shrink, shrink_spec
from sfwprune.prune.structured import channel_spaces, structured_masks

ARCHS = [
    ("lenet300", (1, 28, 28)),
    ("lenet5", (1, 28, 28)),
    ("lenet5bn", (1, 12, 12)),
    ("vgg16", (3, 32, 32)),
    ("resnet18", (3, 16, 16)),
]


def _model(name: str, shape: tuple[int, int, int]) -> nn.Module:
    model = build_model(name, input_shape=shape, num_classes=10, seed=0)
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():  # BN with non-trivial statistics and affine parameters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "shape"), ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_small_model_equals_masked_model(name: str, shape: tuple, scope: str, tmp_path) -> None:
    model = _model(name, shape)
    masks = structured_masks(model, 0.5, "channel", scope=scope)
    masked = copy.deepcopy(model)
    apply_masks_(masked, masks)
    small = shrink(model, masks)
    assert _params(small) < 0.75 * _params(model)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5, rtol=1e-4)
    # the original is untouched
    assert _params(model) == _params(_model(name, shape))
    # save the widths with the weights; rebuild from the registry; weights_only load
    torch.save({"spec": shrink_spec(small), "state_dict": small.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    rebuilt = resize_(build_model(name, input_shape=shape, num_classes=10), saved["spec"])
    rebuilt.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), small(x))


def test_resnet_residual_channel_zero_in_all_tied_convs_is_dropped() -> None:
    model = _model("resnet18", (3, 8, 8))
    tied = [s for s in channel_spaces(model) if s.tied][1]  # layer2's 128 channels
    modules = dict(model.named_modules())
    gone = torch.tensor([3, 7, 100])
    with torch.no_grad():
        for layer_name, bn_name in tied.producers:
            modules[bn_name].weight[gone] = 0
            modules[bn_name].bias[gone] = 0
            modules[layer_name].weight[gone] = 0
    x = torch.randn(2, 3, 8, 8)
    small = shrink(model)
    assert small.layer2[0].conv2.out_channels == 125
    assert small.layer2[0].shortcut[0].out_channels == 125
    assert small.layer2[1].conv1.in_channels == 125
    assert small.layer3[0].shortcut[0].in_channels == 125
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_residual_channel_zero_in_only_some_tied_convs_is_kept() -> None:
    model = _model("resnet18", (3, 8, 8))
    with torch.no_grad():  # zero in block 0's conv2 only: the shortcut still writes there
        model.layer2[0].bn2.weight[5] = 0
        model.layer2[0].bn2.bias[5] = 0
    small = shrink(model)
    assert small.layer2[0].conv2.out_channels == 128
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_constant_channels_are_not_dropped() -> None:
    """A zero conv row before a BN with a non-zero shift outputs a constant: keep it."""
    model = _model("lenet5bn", (1, 12, 12))
    with torch.no_grad():
        model.features[0].weight[2] = 0
        model.features[0].bias[2] = 0
    assert shrink(model).features[0].out_channels == 6
    with torch.no_grad():
        model.features[1].bias[2] = 0
        model.features[1].running_mean[2] = 0
    small = shrink(model)
    assert small.features[0].out_channels == 5
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-6)


def test_all_zero_layer_keeps_one_channel() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    small = shrink(net)
    assert small[0].out_features == 1 and small[2].in_features == 1
    x = torch.randn(5, 4)
    assert torch.allclose(small(x), net(x))


def test_shrink_rejects_models_it_cannot_handle() -> None:
    with pytest.raises(ValueError, match=r"module '1' \(Sigmoid\)"):
        shrink(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="grouped convolution '0'"):
        shrink(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)))
    with pytest.raises(ValueError, match=r"Invalid mask: no parameter 'nope'"):
        shrink(nn.Sequential(nn.Linear(4, 2)), {"nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"Invalid spec entry: 'x'"):
        resize_(nn.Sequential(nn.Linear(4, 2)), {"x": [1, 2]})
