"""predict_segmentation: a slide's class map, tile by tile, into a pyramidal TIFF OpenSlide opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from lightstream import ImageSizeError
from lightstream.data import SegmentationWriter, open_slide, predict_segmentation, write_synthetic_slide
from lightstream.models import UNet
from lightstream.modules import ImageSegmenter

TILE = 96
NORMALISE = {"mean": [180.0, 140.0, 180.0], "std": [40.0, 40.0, 40.0]}


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("predict") / "slide.tif"
    write_synthetic_slide(path, size=(384, 512), lesions=2, seed=1, compression="zlib", lesion_radius=60.0)
    return path


def _segmenter() -> ImageSegmenter:
    torch.manual_seed(0)
    return ImageSegmenter(UNet(3, num_classes=2, depth=2, width=4).double(), TILE, num_classes=2, **NORMALISE)


def _whole_image_classes(model: ImageSegmenter, slide) -> np.ndarray:
    engine = model.stream_network
    with torch.no_grad():
        logits = engine.stream_module(engine.prepare_input(slide.read(slice(None), slice(None))))
    return logits.argmax(1)[0].numpy()


def test_the_written_map_is_the_whole_image_argmax_and_openslide_opens_it(slide_path: Path, tmp_path: Path) -> None:
    model = _segmenter()
    with open_slide(slide_path) as slide:
        assert min(model.stream_network.plan(slide.shape).grid) >= 3
        expected = _whole_image_classes(model, slide)
        path = predict_segmentation(model, slide, tmp_path / "pred.tif", overlay=tmp_path / "pred.png", tile=64)
        thumbnail = slide.thumbnail(1024)
        mpp = slide.mpp
    assert 0.05 < expected.mean() < 0.95  # both classes present: a shifted or missing tile would show
    with openslide.OpenSlide(path) as raw:
        assert raw.level_dimensions[0] == (512, 384) and raw.level_count == 4
        assert float(raw.properties["openslide.mpp-x"]) == pytest.approx(mpp)
        written = np.asarray(raw.read_region((0, 0), 0, (512, 384)))[..., 0]
    np.testing.assert_array_equal(written, expected)
    overlay = np.asarray(Image.open(tmp_path / "pred.png"))
    assert overlay.shape == thumbnail.shape
    tinted = (overlay != thumbnail).any(-1)
    assert tinted.any() and not tinted.all()


def test_the_map_goes_to_the_writer_one_output_tile_at_a_time(slide_path: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    blocks: list[tuple[int, int]] = []
    write = SegmentationWriter.write
    monkeypatch.setattr(SegmentationWriter, "write",
                        lambda self, rows, cols, labels: (blocks.append(tuple(labels.shape)),
                                                          write(self, rows, cols, labels)))
    model = _segmenter()
    with open_slide(slide_path) as slide:
        plan = model.stream_network.plan(slide.shape)
        predict_segmentation(model.stream_network, slide, tmp_path / "pred.tif")
    assert len(blocks) == len(plan.tiles)
    largest = max(tile.output.height * tile.output.width for tile in plan.tiles)
    assert max(height * width for _, height, width in blocks) == largest < 384 * 512 / 4


def test_misuse_is_refused_before_anything_runs(slide_path: Path, tmp_path: Path) -> None:
    model = _segmenter()
    with pytest.raises(ValueError, match="one image"):
        predict_segmentation(model, torch.zeros(2, 3, 64, 64, dtype=torch.float64), tmp_path / "two.tif")
    with pytest.raises(TypeError, match="needs an opened Slide"):
        predict_segmentation(model, torch.zeros(1, 3, 64, 64, dtype=torch.float64), tmp_path / "t.tif",
                             overlay=tmp_path / "t.png")
    with pytest.raises(ImageSizeError, match="cannot run on a 66x64 image"):
        predict_segmentation(model, torch.zeros(1, 3, 66, 64, dtype=torch.float64), tmp_path / "odd.tif")
    with pytest.raises(TypeError, match="ImageSegmenter"):
        predict_segmentation(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 64, 64), tmp_path / "c.tif")
    (tmp_path / "exists.tif").touch()
    with open_slide(slide_path) as slide, pytest.raises(FileExistsError):
        predict_segmentation(model, slide, tmp_path / "exists.tif")
