"""Streaming equals whole-image training (float64) on torchvision trunks with random weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from tests.conftest import assert_streaming_exact


def _randomise_batchnorm(trunk: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BN gradients are really tested."""
    for module in trunk.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return trunk


def _prepare(trunk: nn.Module) -> nn.Module:
    return _randomise_batchnorm(trunk).double().eval()


@pytest.mark.parametrize("stages", [None, "auto"], ids=["one-stage", "auto-stages"])
def test_resnet18_full_trunk_batch2_non_square_is_exact(stages: str | None) -> None:
    trunk = _prepare(nn.Sequential(*list(models.resnet18().children())[:-2]))
    image = torch.randn(2, 3, 608, 576, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=(528, 512), stages=stages)


def test_resnet50_up_to_layer2_is_exact() -> None:
    trunk = _prepare(nn.Sequential(*list(models.resnet50().children())[:-4]))
    image = torch.randn(1, 3, 200, 232, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=136)


def test_convnext_tiny_first_stages_with_layer_scale_and_channel_layernorm_are_exact() -> None:
    features = models.convnext_tiny().features[:4]
    for module in features.modules():  # layer scale starts at 1e-6: make it matter
        if hasattr(module, "layer_scale"):
            nn.init.uniform_(module.layer_scale, 0.5, 1.5)
    trunk = features.double().eval()
    image = torch.randn(1, 3, 320, 288, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=272)


def test_mobilenet_v2_inverted_residuals_are_exact() -> None:
    trunk = _prepare(models.mobilenet_v2().features[:7])
    image = torch.randn(2, 3, 150, 131, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=96, stages=None)


def test_vgg11_features_are_exact() -> None:
    trunk = models.vgg11().features[:11].double().eval()
    image = torch.randn(1, 3, 120, 97, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=72)


def test_densenet_concatenation_is_exact() -> None:
    trunk = _prepare(models.densenet121().features[:6])
    image = torch.randn(1, 3, 112, 120, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=80)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "convnext_tiny", "mobilenet_v2", "vgg16",
                                  "densenet121"])
def test_full_torchvision_trunks_trace_without_error(arch: str) -> None:
    from lightstream import StreamingCNN

    net = getattr(models, arch)()
    trunk = nn.Sequential(*list(net.children())[:-2]) if arch.startswith("resnet") else net.features
    scnn = StreamingCNN(trunk.eval(), tile_size=4096)
    assert scnn.geometry.output_stride == (32, 32)
