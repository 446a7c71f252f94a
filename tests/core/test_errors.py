"""Bad trunks and bad tiles are refused with a message naming the layer or the minimum tile."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN, TileTooSmallError, UnsupportedLayerError


class SpatialLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.mix = nn.Linear(30, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.conv(x))  # Linear over the width axis: not local


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.conv(x), self.conv(x), self.conv(x))[0]


class PositionalEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pos = nn.Parameter(torch.zeros(1, 4, 30, 30))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.pos


@pytest.mark.parametrize(("trunk", "path", "why"), [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)), "1", "global pooling"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), "1", "statistics over all positions"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)), "1", "statistics over all positions"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), "1", "training mode"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5)).train(), "1", "random"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "1", "reshapes"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), "1",
     "align_corners=True"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")), "0", "wraps around"),
    (SpatialLinear(), "mix", "Linear over space"),
    (Attention(), "attn", "attention"),
    (PositionalEmbedding(), "add", "varies over space"),
], ids=["adaptive-pool", "groupnorm", "instancenorm", "batchnorm-train", "dropout-train", "flatten",
        "upsample", "circular-padding", "linear-over-space", "attention", "positional-embedding"])
def test_non_local_layers_are_refused_naming_the_layer_and_why(trunk: nn.Module, path: str, why: str) -> None:
    with pytest.raises(UnsupportedLayerError) as info:
        StreamingCNN(trunk, tile_size=64)
    assert path in info.value.path
    assert why in str(info.value)
    assert f"'{info.value.path}'" in str(info.value)


def test_squeeze_excitation_in_mobilenet_v3_is_refused_with_its_module_path() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"layer .1\.block\.1\.avgpool.: adaptive/global pooling"):
        StreamingCNN(models.mobilenet_v3_small().features.eval(), tile_size=512)


def test_batchnorm_switched_to_training_after_construction_is_refused_at_forward() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    scnn = StreamingCNN(trunk, tile_size=16)
    trunk.train()
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        scnn(torch.randn(1, 3, 40, 40))


def test_tile_smaller_than_the_receptive_field_names_the_minimum_tile() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 7), nn.MaxPool2d(2), nn.Conv2d(4, 4, 5))  # field 7 + 1 + 2*4 = 16
    with pytest.raises(TileTooSmallError, match="smallest tile that works is 16 px") as info:
        StreamingCNN(trunk, tile_size=12)
    assert info.value.minimum == (16, 16)
    assert StreamingCNN(trunk, tile_size=16).geometry.receptive_field == (16, 16)


def test_resnet18_minimum_tile_is_its_receptive_field_of_435_px() -> None:
    trunk = nn.Sequential(*list(models.resnet18().children())[:-2]).eval()
    with pytest.raises(TileTooSmallError, match="smallest tile that works is 435 px"):
        StreamingCNN(trunk, tile_size=434, stages=None)
    StreamingCNN(trunk, tile_size=435, stages=None)


def test_staged_resnet18_minimum_tile_is_its_first_stages_receptive_field() -> None:
    trunk = nn.Sequential(*list(models.resnet18().children())[:-2]).eval()
    with pytest.raises(TileTooSmallError, match="smallest tile that works is 11 px"):
        StreamingCNN(trunk, tile_size=10)
    StreamingCNN(trunk, tile_size=11)


def test_image_too_small_for_the_trunk_is_refused_with_its_size() -> None:
    scnn = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 7)), tile_size=16)
    with pytest.raises(ValueError, match="5x5 px is too small"):
        scnn.plan((5, 5))


def test_gradient_of_the_wrong_size_is_refused_quoting_the_feature_map_shape() -> None:
    scnn = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3)), tile_size=16)
    image = torch.randn(1, 3, 40, 40)
    scnn(image)
    with pytest.raises(ValueError, match=r"feature map the forward returned has shape \(1, 4, 38, 38\)"):
        scnn.backward(image, torch.zeros(1, 4, 10, 10))


def test_missing_gradient_explains_requires_grad() -> None:
    scnn = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3)), tile_size=16)
    image = torch.randn(1, 3, 40, 40)
    scnn(image)
    with pytest.raises(ValueError, match="requires_grad_"):
        scnn.backward(image, None)


def test_replacing_a_layer_rebuilds_the_geometry_instead_of_using_a_stale_one() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    scnn = StreamingCNN(trunk, tile_size=32)
    assert scnn.geometry.receptive_field == (5, 5)
    trunk[1] = nn.Conv2d(4, 4, 7)
    assert scnn.geometry.receptive_field == (9, 9)
    image = torch.randn(1, 3, 50, 50)
    torch.testing.assert_close(scnn(image), trunk(image).detach(), rtol=1e-5, atol=1e-5)


def test_an_intermediate_map_that_would_be_empty_makes_the_image_too_small() -> None:
    trunk = nn.Sequential(nn.Conv2d(1, 1, 1, stride=(6, 1)), nn.Conv2d(1, 1, (5, 1), dilation=(3, 1)),
                          nn.Conv2d(1, 1, 1, padding=(1, 0)))  # padding alone must not revive it
    scnn = StreamingCNN(trunk, tile_size=128, stages=None)
    with pytest.raises(ValueError, match="64x64 px is too small"):
        scnn.plan((64, 64))
    assert scnn.plan((128, 64)).output_size == (12, 64)
