"""Models of the experiments: LeNet-300-100, LeNet-5 (+BN), CIFAR ResNet-18 and VGG-16."""

from .lenet import LeNet5, LeNet300
from .registry import MODELS, build_model
from .resnet import BasicBlock, ResNet18
from .vgg import VGG, VGG16_CFG

__all__ = [
    "MODELS",
    "VGG",
    "VGG16_CFG",
    "BasicBlock",
    "LeNet5",
    "LeNet300",
    "ResNet18",
    "build_model",
]
