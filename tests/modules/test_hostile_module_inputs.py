"""Hostile inputs to the Lightning layer: each misuse gets an error naming what was wrong and what to do."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from lightstream.modules import ImageClassifier, StreamingModule, TileCache, TrunkGeometryError, predict_slide
from lightstream.modules.checkpoint import CHECKPOINT_KEY
from streaming_helpers import TILE, AutogradStyle, image_data, loader, quiet_trainer, tiny_head, tiny_trunk

LOGGER = "lightstream.modules"


def _classifier(trunk: nn.Module | None = None, **kwargs) -> ImageClassifier:
    return ImageClassifier(trunk if trunk is not None else tiny_trunk(), tiny_head(), TILE, **kwargs)


def _image(batch: int = 1) -> torch.Tensor:
    return image_data(batch).tensors[0]


# ------------------------------------------------------------------------------------ predict_slide
def test_predict_slide_refuses_a_batch_of_two_instead_of_returning_the_first_images_result() -> None:
    with pytest.raises(ValueError, match=r"one image of shape \[1, C, H, W\], got shape \[2, 3, 36, 28\]: call it "
                                         r"once per image"):
        predict_slide(_classifier(), _image(2))


def test_predict_slide_of_one_image_of_a_batch_is_that_images_result() -> None:
    model, images = _classifier(), _image(2)
    second = predict_slide(model, images[1:2])
    with torch.no_grad():
        assert torch.allclose(second.logits, model.eval()(images)[1], atol=1e-12)


@pytest.mark.parametrize("target", [3, -1, 1.0, True])
def test_predict_slide_refuses_a_target_that_is_not_a_class_index(target) -> None:
    with pytest.raises(ValueError, match=rf"target must be a class index in 0\.\.2, got {target!r}"):
        predict_slide(_classifier(), _image(), saliency=True, target=target)


def test_predict_slide_refuses_a_model_that_is_not_a_streaming_classifier() -> None:
    with pytest.raises(TypeError, match="predict_slide needs an ImageClassifier .* got Sequential"):
        predict_slide(tiny_trunk(), _image())


def test_predict_slide_refuses_an_image_without_a_shape() -> None:
    with pytest.raises(TypeError, match=r"image must be a \[1, C, H, W\] tensor or an image source, got str"):
        predict_slide(_classifier(), "slide.tif")


# ------------------------------------------------------------------------------------- constructors
def test_a_trunk_that_is_not_a_module_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="stream_network must be an nn.Module .* got str 'resnet18'"):
        StreamingModule("resnet18", TILE)


def test_train_streaming_layers_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="train_streaming_layers must be True or False, got 'no'"):
        AutogradStyle(tiny_trunk(), tiny_head(), train_streaming_layers="no")


def test_a_tile_cache_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "cache.json"
    not_a_folder.write_text("{}")
    with pytest.raises(NotADirectoryError, match=r"tile_cache_dir '.*cache\.json' is not an existing directory"):
        AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=not_a_folder)


@pytest.mark.parametrize("name", ["sub/cache.json", "..", "", 3])
def test_a_tile_cache_fname_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name) -> None:
    with pytest.raises(ValueError, match=rf"tile_cache_fname must be a file name inside tile_cache_dir .*got {name!r}"):
        AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=tmp_path, tile_cache_fname=name)
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_engine_option_is_named() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'tile_sise'"):
        AutogradStyle(tiny_trunk(), tiny_head(), tile_sise=32)


def test_a_head_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match="head must be an nn.Module .* got function"):
        ImageClassifier(tiny_trunk(), lambda fmap: fmap.mean((2, 3)), TILE)


def test_a_loss_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match=r"loss_fn must be callable as loss_fn\(logits, target\), got 'ce'"):
        _classifier(loss_fn="ce")


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), float("inf"), "1e-3"])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(lr) -> None:
    with pytest.raises(ValueError, match=rf"lr must be a positive finite number, got {lr!r}"):
        _classifier(lr=lr)


def test_a_head_of_the_wrong_width_names_the_feature_maps_shape_and_channels() -> None:
    wide_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3)).double()
    model = ImageClassifier(tiny_trunk(), wide_head, TILE)
    with pytest.raises(RuntimeError, match=r"feature map of shape \[1, 5, 9, 7\].*must take the trunk's 5 output "
                                           r"channels") as info:
        model(_image())
    assert "mat1 and mat2" in str(info.value.__cause__)


# ------------------------------------------------------------------------------------ the tile cache
@pytest.mark.parametrize(("field", "value", "reason"), [
    ("tile_size", "16", "field 'tile_size' is '16', expected a list of two integers"),
    ("tile_size", [16], "field 'tile_size' is [16], expected a list of two integers"),
    ("receptive_field", [15, "15"], "field 'receptive_field' is [15, '15'], expected a list of two integers"),
    ("output_stride", [True, 4], "field 'output_stride' is [True, 4], expected a list of two integers"),
    ("tile_stride", 12, "field 'tile_stride' is 12, expected a list of two integers"),
    ("architecture", 1234, "field 'architecture' is 1234, expected a string"),
    ("dtype", None, "field 'dtype' is None, expected a string"),
])
def test_a_cache_field_of_the_wrong_type_is_logged_naming_the_file_and_rebuilt(tmp_path: Path, caplog, field,
                                                                              value, reason) -> None:
    path = tmp_path / "cache.json"
    AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=tmp_path, tile_cache_fname="cache.json")
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, field: value}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=tmp_path, tile_cache_fname="cache.json")
    assert f"ignoring tile cache {path}" in caplog.text and reason in caplog.text
    assert json.loads(path.read_text()) == payload  # rebuilt
    assert model.load_tile_cache_if_needed() == TileCache.read(path)


@pytest.mark.parametrize(("content", "reason"), [
    ('{"format": 1}', "field 'architecture' is missing"),
    ("[1, 2, 3]", "a JSON list, not an object"),
    ('"tile cache"', "a JSON str, not an object"),
])
def test_a_cache_missing_fields_or_not_an_object_is_rebuilt(tmp_path: Path, caplog, content, reason) -> None:
    path = tmp_path / "cache.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=tmp_path, tile_cache_fname="cache.json")
    assert f"ignoring tile cache {path}" in caplog.text and reason in caplog.text
    assert TileCache.read(path) is not None


def test_cache_warnings_are_logged_on_global_rank_zero_only(tmp_path: Path, caplog, monkeypatch) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    (tmp_path / "cache.json").write_text("{not json")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=tmp_path, tile_cache_fname="cache.json")
    assert "tile cache" not in caplog.text


# -------------------------------------------------------------------------------------- checkpoints
def _other_stride() -> nn.Sequential:
    """The tiny trunk with the strided convolution at stride 1: the same parameter shapes, output stride 2."""
    trunk = tiny_trunk()
    trunk[3].stride = (1, 1)
    return trunk


def _other_dilation() -> nn.Sequential:
    """The tiny trunk with a dilated last convolution: the same parameter shapes and output stride."""
    trunk = tiny_trunk()
    trunk[6].dilation, trunk[6].padding = (2, 2), (2, 2)
    return trunk


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Trainer checkpoint of the tiny classifier after one step."""
    torch.manual_seed(0)
    model = _classifier()
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, loader(image_data(2), 2))
    path = tmp_path_factory.mktemp("checkpoints") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_checkpoint_records_the_trunks_geometry(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=False)[CHECKPOINT_KEY]
    fingerprint = _classifier().stream_network.geometry.fingerprint
    assert saved == {"fingerprint": fingerprint, "output_stride": (4, 4), "receptive_field": (15, 15)}


def test_a_checkpoint_loads_into_the_same_trunk_without_a_warning(checkpoint: Path, recwarn) -> None:
    restored = ImageClassifier.load_from_checkpoint(checkpoint, stream_network=tiny_trunk(), head=tiny_head())
    assert not [w for w in recwarn if "trunk geometry" in str(w.message)]
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(restored.state_dict()[key], value) for key, value in saved.items())


@pytest.mark.parametrize(("build", "theirs"), [
    (_other_stride, "this trunk has output stride 2x2 / receptive field 10x10"),
    (_other_dilation, "this trunk has output stride 4x4 / receptive field 23x23"),
], ids=["stride", "dilation"])
def test_load_from_checkpoint_refuses_a_trunk_of_the_same_shapes_but_another_geometry(checkpoint: Path, build,
                                                                                    theirs) -> None:
    with pytest.raises(TrunkGeometryError, match=r"saved from a trunk with output stride 4x4 / receptive field 15x15 "
                                                 rf".*; {theirs} .*build the model with the same trunk"):
        ImageClassifier.load_from_checkpoint(checkpoint, stream_network=build(), head=tiny_head())


def test_resuming_a_fit_into_a_trunk_of_another_stride_is_refused(checkpoint: Path) -> None:
    model = _classifier(_other_stride())
    with pytest.raises(TrunkGeometryError, match="saved from a trunk with output stride 4x4"):
        quiet_trainer(max_steps=2).fit(model, loader(image_data(2), 2), ckpt_path=checkpoint)


def test_an_old_checkpoint_without_the_record_loads_with_a_warning(checkpoint: Path, tmp_path: Path) -> None:
    old = torch.load(checkpoint, weights_only=False)
    del old[CHECKPOINT_KEY]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="records no trunk geometry .* built with the trunk it was trained with"):
        restored = ImageClassifier.load_from_checkpoint(tmp_path / "old.ckpt", stream_network=_other_stride(),
                                                        head=tiny_head())
    assert restored.stream_network.output_stride == (2, 2)  # not checkable: loaded as asked


def test_a_malformed_geometry_record_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    broken = torch.load(checkpoint, weights_only=False)
    broken[CHECKPOINT_KEY] = {"fingerprint": "abc"}
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(TrunkGeometryError, match=f"the checkpoint's '{CHECKPOINT_KEY}' entry is malformed"):
        ImageClassifier.load_from_checkpoint(tmp_path / "broken.ckpt", stream_network=tiny_trunk(), head=tiny_head())
