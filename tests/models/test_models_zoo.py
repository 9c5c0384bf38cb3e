"""Model zoo: shapes for every model × input size, parameter counts, seeding, default init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune.constraints import expected_init_norms
from sfwprune.models import MODELS, LeNet5, build_model

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 8, 8)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shape(name, shape):
    model = build_model(name, input_shape=shape, num_classes=7, seed=0).eval()
    batch = 1 if shape[1] > 32 else 2  # keep the 64×64 ResNet/VGG passes cheap
    with torch.no_grad():
        out = model(torch.randn(batch, *shape))
    assert out.shape == (batch, 7) and torch.isfinite(out).all()


def test_registry_names_and_errors():
    assert MODELS == ("lenet300", "lenet5", "lenet5bn", "resnet18", "vgg16")
    with pytest.raises(ValueError, match="Invalid model: 'resnet50'.*lenet300.*vgg16"):
        build_model("resnet50", input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ValueError, match=r"Invalid input_shape: \(28, 28\)"):
        build_model("lenet300", input_shape=(28, 28), num_classes=10)
    with pytest.raises(ValueError, match="Invalid num_classes: 1"):
        build_model("lenet300", input_shape=(1, 28, 28), num_classes=1)
    with pytest.raises(ValueError, match="LeNet-5 needs H, W >= 4"):
        build_model("lenet5", input_shape=(1, 3, 3), num_classes=10)


def test_parameter_counts():
    def count(name, shape=(1, 28, 28), k=10):
        return _count(build_model(name, input_shape=shape, num_classes=k, seed=0))

    assert count("lenet300") == 266_610  # 784·300+300 + 300·100+100 + 100·10+10
    assert count("lenet5") == 61_706  # the classic LeNet-5 count
    assert count("lenet5", (3, 32, 32)) == 62_006  # 32×32 without padding: same 16×5×5 map
    assert count("lenet5bn") == 61_706 + 2 * (6 + 16)
    assert count("resnet18", (3, 32, 32)) == 11_173_962  # CIFAR ResNet-18
    assert count("vgg16", (3, 32, 32)) == 14_728_266  # CIFAR VGG-16-BN, one Linear(512, 10)
    assert count("resnet18", (3, 64, 64), 200) == 11_173_962 + 512 * 190 + 190


def test_architecture_details():
    resnet = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert resnet.stem[0].kernel_size == (3, 3) and resnet.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules())
    assert [len(s) for s in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)] == [2] * 4
    vgg = build_model("vgg16", input_shape=(3, 32, 32), num_classes=10, seed=0)
    convs = [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13
    bn = build_model("lenet5bn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    layers = list(bn.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d)
    plain = LeNet5((1, 28, 28), 10)
    assert plain.features[0].padding == (2, 2) and plain.features[3].padding == (0, 0)
    assert LeNet5((3, 32, 32), 10).features[0].padding == (0, 0)


def test_lenet5bn_running_stats_update_in_train_mode():
    model = build_model("lenet5bn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()(torch.randn(4, 1, 8, 8) + 3.0)
    assert not torch.equal(before, bn.running_mean)


@pytest.mark.parametrize("name", MODELS)
def test_seed_determinism_and_global_rng_untouched(name):
    shape = (1, 8, 8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(name, input_shape=shape, num_classes=10, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # seed= forks the RNG
    b = build_model(name, input_shape=shape, num_classes=10, seed=5)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_other_seed_differs_and_global_seed_reproduces():
    def params(**kw):
        model = build_model("lenet5bn", input_shape=(1, 8, 8), num_classes=10, **kw)
        return [p.detach() for p in model.parameters()]

    a, c = params(seed=5), params(seed=6)
    assert all(not torch.equal(pa, pc) for pa, pc in zip(a, c, strict=True) if pa.std() > 0)
    torch.manual_seed(9)
    d = params()
    torch.manual_seed(9)
    assert all(torch.equal(pd, pe) for pd, pe in zip(d, params(), strict=True))


@pytest.mark.parametrize("name", ["lenet300", "lenet5bn", "resnet18"])
def test_default_init_matches_what_constraint_sizing_assumes(name):
    # The paper sizes each set from E||θ_init|| over default inits; the models must use them.
    # Tensors of >= 1000 entries only: their norms concentrate within a few percent.
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10, seed=0)
    expected = expected_init_norms(model, samples=2)
    for pname, p in model.named_parameters():
        if p.numel() >= 1000:
            assert float(p.detach().norm()) == pytest.approx(expected[pname], rel=0.1), pname


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "lenet5bn", "resnet18"])
def test_every_parameter_gets_a_gradient(name):
    model = build_model(name, input_shape=(1, 8, 8), num_classes=3, seed=0)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["lenet5bn", "resnet18"])
def test_cuda_channels_last_matches_cpu(name):
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10, seed=0).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        gpu = model.cuda().to(memory_format=torch.channels_last)
        got = gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-2, atol=1e-2)  # TF32 convs allowed
