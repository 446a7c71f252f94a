"""Streamable trunks by name: torchvision ResNets, ConvNeXts and MobileNetV2, and a small CNN for CPUs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models import WeightsEnum

from ._torchvision import build_network, normalization_defaults
from .convnext import CONVNEXT_NAMES, split_convnext
from .mobilenet import split_mobilenet_v2
from .resnet import RESNET_NAMES, split_resnet

__all__ = ["BACKBONE_NAMES", "Backbone", "build_backbone"]

BACKBONE_NAMES = ("small_cnn", *RESNET_NAMES, *CONVNEXT_NAMES, "mobilenet_v2")
"""The names :func:`build_backbone` accepts."""

_IMAGENET_MEAN_UINT8 = [0.485 * 255, 0.456 * 255, 0.406 * 255]
_IMAGENET_STD_UINT8 = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass
class Backbone:
    """A streamable trunk and what a head and the engine need to know about it.

    Attributes:
        trunk: the convolutional layers (no global pooling).
        channels: channels of the trunk's feature map.
        mean, std: per-channel normalisation for ``uint8`` RGB images (slides): the
            pretrained weights' statistics times 255, or ImageNet's without weights.
    """

    trunk: nn.Module
    channels: int
    mean: list[float]
    std: list[float]


def build_backbone(name: str, weights: WeightsEnum | str | None = None) -> Backbone:
    """The trunk of torchvision's ``name`` (see :data:`BACKBONE_NAMES`), split where its pooling starts.

    ``weights`` (``None``, ``"DEFAULT"``, ``"IMAGENET1K_V1"``...) loads pretrained weights
    (downloaded by torchvision once). ``"small_cnn"`` is four 3x3 convolutions with ReLU and
    three 2x2 max-poolings (16-32-64-64 channels, output stride 8, receptive field 38 px): a
    trunk that trains in seconds on a CPU, for trying the pipeline out.
    """
    if name == "small_cnn":
        if weights is not None:
            raise ValueError("small_cnn has no pretrained weights; use weights=None")
        return Backbone(_small_cnn(), 64, _IMAGENET_MEAN_UINT8, _IMAGENET_STD_UINT8)
    if name not in BACKBONE_NAMES:
        raise ValueError(f"backbone must be one of {BACKBONE_NAMES}, got {name!r}")
    network, resolved = build_network(name, weights, num_classes=1000)
    if name in RESNET_NAMES:
        trunk, _ = split_resnet(network)
        channels = network.fc.in_features
    elif name in CONVNEXT_NAMES:
        trunk, _ = split_convnext(network)
        channels = network.classifier[-1].in_features
    else:
        trunk, _ = split_mobilenet_v2(network)
        channels = network.classifier[-1].in_features
    statistics = normalization_defaults(resolved, {})
    mean = [255 * value for value in statistics["mean"]] if statistics else _IMAGENET_MEAN_UINT8
    std = [255 * value for value in statistics["std"]] if statistics else _IMAGENET_STD_UINT8
    return Backbone(trunk, channels, mean, std)


def _small_cnn() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = [3, 16, 32, 64, 64]
    for index, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # keeps the activations' scale through depth
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
        if index < 3:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)
