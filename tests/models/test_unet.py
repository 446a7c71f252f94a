"""The ready U-Nets stream exactly (float64: output, every parameter gradient, image gradient)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import ResNet18_Weights, WeightsEnum, resnet18

from lightstream.models import UNet, resnet_unet
from tests.conftest import assert_streaming_exact, randomise_batch_norm


@pytest.mark.parametrize("up", ["transpose", "bilinear", "nearest", "pixel_shuffle"])
def test_a_plain_unet_streams_exactly(up: str) -> None:
    unet = UNet(3, num_classes=3, depth=3, width=4, up=up).double().eval()
    image = torch.randn(2, 3, 144, 200, dtype=torch.float64)
    scnn = assert_streaming_exact(unet, image, (128, 144), min_tiles_per_axis=2)
    assert scnn.output_stride == (1, 1)
    assert scnn.plan(image.shape).output_size == (144, 200)


def test_a_resnet18_unet_streams_exactly() -> None:
    model = randomise_batch_norm(resnet_unet("resnet18", num_classes=2, encoder_depth=3,
                                                   decoder_channels=(8, 6, 4)))
    scnn = assert_streaming_exact(model, torch.randn(2, 3, 208, 240, dtype=torch.float64), (176, 208))
    assert scnn.output_stride == (1, 1)


def test_unet_output_has_the_image_size_and_the_class_channels() -> None:
    unet = UNet(in_channels=1, num_classes=5, depth=2, width=3)
    assert unet(torch.zeros(1, 1, 20, 28)).shape == (1, 5, 20, 28)
    assert unet.size_multiple == 4
    assert resnet_unet("resnet18", num_classes=4, encoder_depth=2).size_multiple == 4


def test_resnet_unet_passes_weights_through_to_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    pretrained = resnet18(weights=None).state_dict()
    pretrained["conv1.weight"].fill_(0.25)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: pretrained)
    model = resnet_unet("resnet18", num_classes=2, weights="IMAGENET1K_V1", encoder_depth=2)
    assert bool((model.encoder[0][0].weight == 0.25).all())
    assert model.mean == list(ResNet18_Weights.IMAGENET1K_V1.transforms().mean)
    assert model.std == list(ResNet18_Weights.IMAGENET1K_V1.transforms().std)
    assert resnet_unet("resnet18", encoder_depth=1).mean is None


@pytest.mark.parametrize(("build", "message"), [
    (lambda: UNet(up="deconv"), "up must be one of"),
    (lambda: UNet(depth=0), "depth must be a positive integer"),
    (lambda: UNet(width=2.5), "width must be a positive integer"),
    (lambda: resnet_unet("vgg16"), "model_name must be one of"),
    (lambda: resnet_unet(encoder_depth=6), "encoder_depth must be 1..5"),
    (lambda: resnet_unet(encoder_depth=3, decoder_channels=(8, 8)), "one entry per encoder stage"),
])
def test_bad_unet_arguments_are_refused_naming_the_argument(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
