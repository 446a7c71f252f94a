"""Tissue detection: Otsu on HSV saturation of a thumbnail, and the tissue bounding box."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lightstream.data import Box, SyntheticSlide, mask_box, open_slide, otsu_threshold, tissue_box, tissue_mask
from lightstream.data.tissue import saturation


def test_otsu_threshold_separates_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)]).clip(0, 1)
    assert 0.2 < otsu_threshold(values) < 0.5


def test_saturation_is_zero_for_greys_and_black_and_one_for_pure_colours() -> None:
    rgb = np.array([[255, 255, 255], [128, 128, 128], [0, 0, 0], [255, 0, 0], [0, 200, 100]], np.uint8)
    np.testing.assert_allclose(saturation(rgb), [0, 0, 0, 1, 1])


def test_tissue_mask_ignores_isolated_specks() -> None:
    image = np.full((40, 40, 3), 245, np.uint8)
    image[10:30, 10:30] = (230, 150, 190)  # tissue
    image[2, 35] = (200, 40, 40)  # a speck of dust
    mask, _ = tissue_mask(image)
    assert mask[12:28, 12:28].all()
    assert not mask[2, 35]


def test_tissue_box_contains_the_lesions_and_excludes_glass(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=1) as slide:
        box = tissue_box(slide)
        assert box is not None
        for lesion in lesion_slide.lesions:
            assert box.top <= lesion.center_y / 2 < box.bottom
            assert box.left <= lesion.center_x / 2 < box.right
        whole = slide.read(slice(None), slice(None))[0].permute(1, 2, 0).numpy()
    stained = saturation(whole) > 0.15
    inside = np.zeros_like(stained)
    inside[box.top : box.bottom, box.left : box.right] = True
    assert stained[~inside].mean() < 0.002  # essentially no stained pixels outside the box


def test_tissue_box_at_two_levels_describes_the_same_region(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=0) as full, open_slide(lesion_slide.path, level=2) as quarter:
        fine, coarse = tissue_box(full), tissue_box(quarter)
    assert fine is not None and coarse is not None
    for fine_edge, coarse_edge in zip(
        (fine.top, fine.left, fine.bottom, fine.right), (coarse.top, coarse.left, coarse.bottom, coarse.right), strict=True
    ):
        assert abs(fine_edge / 4 - coarse_edge) <= 1


def test_blank_slide_has_no_tissue_box(tmp_path: Path, write_tiled_tiff, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    glass = (245 + rng.integers(-3, 4, (256, 256, 3))).astype(np.uint8)
    path = write_tiled_tiff(tmp_path / "blank.tif", [glass])
    with open_slide(path) as slide, caplog.at_level(logging.WARNING):
        assert tissue_box(slide) is None
    assert "blank.tif: found no tissue" in caplog.text


def test_mask_box_scales_mask_pixels_to_level_pixels_with_margin_clipped() -> None:
    mask = np.zeros((4, 6), bool)
    mask[1, 2] = True
    assert mask_box(mask, (400, 600)) == Box(100, 200, 200, 300)
    assert mask_box(mask, (400, 600), margin=150) == Box(0, 50, 350, 450)
    assert mask_box(np.zeros((4, 6)), (400, 600)) is None


def test_tissue_box_crops_away_the_glass_around_the_tissue(plain_slide: SyntheticSlide) -> None:
    with open_slide(plain_slide.path) as slide:
        box = tissue_box(slide)
    assert box is not None
    assert box.height * box.width < 0.7 * 768 * 640
