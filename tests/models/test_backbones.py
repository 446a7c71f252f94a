"""Ready backbones: torchvision classifiers split into a streamed trunk and a head, exactly."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from lightstream import UnsupportedLayerError
from lightstream.models import StreamingConvNext, StreamingMobileNetV2, StreamingResNet
from lightstream.modules import ImageClassifier

BACKBONES = [  # (torchvision name, build with a tile of at least the receptive field, last trunk layer, first head)
    ("resnet18", lambda **kw: StreamingResNet("resnet18", 512, **kw), "layer4", "avgpool"),
    ("resnet34", lambda **kw: StreamingResNet("resnet34", 1024, **kw), "layer4", "avgpool"),
    ("resnet50", lambda **kw: StreamingResNet("resnet50", 512, **kw), "layer4", "avgpool"),
    ("convnext_tiny", lambda **kw: StreamingConvNext("convnext_tiny", 1688, **kw), "7", "avgpool"),
    ("convnext_small", lambda **kw: StreamingConvNext("convnext_small", 3416, **kw), "7", "avgpool"),
    ("mobilenet_v2", lambda **kw: StreamingMobileNetV2(512, **kw), "18", "avgpool"),
]


def _torchvision_key(model_name: str, trunk_key: str) -> str:
    """Our trunk's state-dict key in torchvision's model (ConvNeXt/MobileNet trunks are ``features``)."""
    return trunk_key if model_name.startswith("resnet") else f"features.{trunk_key}"


def _twins(name: str, build, **kwargs) -> tuple[ImageClassifier, nn.Module]:
    """Our model and torchvision's, from the same random initialisation."""
    torch.manual_seed(0)
    model = build(num_classes=3, **kwargs)
    torch.manual_seed(0)
    options = {"stochastic_depth_prob": 0.0} if name.startswith("convnext") else {}
    return model, torchvision.models.get_model(name, num_classes=3, **options)


@pytest.mark.parametrize(("name", "build", "last_trunk", "first_head"), BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbone_splits_into_trunk_and_head_that_compute_torchvisions_model(name, build, last_trunk,
                                                                             first_head) -> None:
    model, reference = _twins(name, build)
    trunk = model.stream_network.stream_module
    assert list(trunk.named_children())[-1][0] == last_trunk
    assert list(model.head.named_children())[0][0] == first_head
    # torchvision's parameter names, split between trunk and head
    names = {_torchvision_key(name, key) for key in trunk.state_dict()} | set(model.head.state_dict())
    assert names == set(reference.state_dict())

    model.train()
    assert all(not m.training for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(m.p == 0 for m in trunk.modules() if isinstance(m, torchvision.ops.StochasticDepth))
    image = torch.rand(1, 3, 64, 64)
    fmap = model.forward_streaming(image)  # training mode, with gradients: the engine accepts the trunk
    fmap.sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())

    model.eval()
    reference.eval()
    with torch.no_grad():
        assert (model(image) - reference(image)).abs().max() <= 1e-4


@pytest.mark.parametrize(("build", "cut"), [
    (lambda cut: StreamingResNet("resnet18", 512, last_trunk_layer=cut), "avgpool"),
    (lambda cut: StreamingResNet("resnet18", 512, last_trunk_layer=cut), "fc"),
    (lambda cut: StreamingConvNext("convnext_tiny", 1688, last_trunk_layer=cut), "avgpool"),
    (lambda cut: StreamingMobileNetV2(512, last_trunk_layer=cut), "classifier"),
], ids=["resnet-avgpool", "resnet-fc", "convnext-avgpool", "mobilenet-classifier"])
def test_a_trunk_cut_including_global_pooling_is_refused_with_the_engines_reason(build, cut) -> None:
    with pytest.raises(UnsupportedLayerError, match="cannot stream layer 'avgpool': adaptive/global pooling"):
        build(cut)


def test_unknown_model_names_and_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="model_name must be one of"):
        StreamingResNet("resnet9", 512)
    with pytest.raises(ValueError, match="last_trunk_layer must be one of"):
        StreamingResNet("resnet18", 512, last_trunk_layer="layer5")


@pytest.mark.parametrize(("name", "build", "cut", "first_head"), [
    ("resnet18", lambda **kw: StreamingResNet("resnet18", 512, **kw), "layer3", "layer4"),
    ("convnext_tiny", lambda **kw: StreamingConvNext("convnext_tiny", 1688, **kw), 5, "6"),
    ("mobilenet_v2", lambda **kw: StreamingMobileNetV2(512, **kw), "13", "14"),
], ids=["resnet18", "convnext_tiny", "mobilenet_v2"])
def test_a_shorter_trunk_moves_the_remaining_layers_to_the_head(name, build, cut, first_head) -> None:
    model, reference = _twins(name, build, last_trunk_layer=cut)
    assert list(model.head.named_children())[0][0] == first_head
    assert model.stream_network.output_stride == (16, 16)
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval()(image) - reference.eval()(image)).abs().max() <= 1e-4


@pytest.mark.parametrize(("name", "build"), [
    ("resnet18", lambda **kw: StreamingResNet("resnet18", 256, **kw)),
    ("convnext_tiny", lambda **kw: StreamingConvNext("convnext_tiny", 256, **kw)),
    ("mobilenet_v2", lambda **kw: StreamingMobileNetV2(256, **kw)),
], ids=["resnet18", "convnext_tiny", "mobilenet_v2"])
def test_flat_trunks_stream_in_stages_with_tiles_smaller_than_the_whole_receptive_field(name, build) -> None:
    model, reference = _twins(name, build, stages="auto")
    engine = model.stream_network
    assert engine.geometry.receptive_field[0] > 256
    image = torch.rand(1, 3, 96, 96)
    assert len(engine.stage_plans(image.shape)) > 1
    with torch.no_grad():
        assert (model.eval()(image) - reference.eval()(image)).abs().max() <= 1e-4


@pytest.mark.parametrize(("name", "build"), [
    ("resnet18", lambda **kw: StreamingResNet("resnet18", 512, **kw)),
    ("convnext_tiny", lambda **kw: StreamingConvNext("convnext_tiny", 1688, **kw)),
    ("mobilenet_v2", lambda **kw: StreamingMobileNetV2(512, **kw)),
], ids=["resnet18", "convnext_tiny", "mobilenet_v2"])
def test_pretrained_weights_load_through_torchvision_and_set_the_normalisation(name, build, monkeypatch) -> None:
    torch.manual_seed(0)
    pretrained = torchvision.models.get_model(name).state_dict()  # stands in for the download
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: pretrained)
    model = build(weights="DEFAULT", num_classes=3)

    trunk = model.stream_network.stream_module.state_dict()
    assert all(torch.equal(value, pretrained[_torchvision_key(name, key)]) for key, value in trunk.items())
    assert [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)] == [3]
    assert torch.allclose(model.stream_network.mean, torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(model.stream_network.std, torch.tensor([0.229, 0.224, 0.225]))


def test_a_checkpoint_rebuilds_the_backbone_from_its_saved_arguments(tmp_path) -> None:
    import lightning as L

    torch.manual_seed(0)
    model = StreamingMobileNetV2(256, num_classes=3, lr=1e-3, stages="auto")
    data = torch.utils.data.TensorDataset(torch.rand(2, 3, 64, 64), torch.tensor([0, 2]))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "model.ckpt")

    restored = StreamingMobileNetV2.load_from_checkpoint(tmp_path / "model.ckpt")
    assert dict(restored.hparams) == {"tile_size": 256, "num_classes": 3, "weights": None,
                                      "last_trunk_layer": None, "train_streaming_layers": True,
                                      "lr": 1e-3, "stages": "auto", "predict_feature_map": False}
    assert restored.tile_size == (256, 256) and restored.lr == 1e-3
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
