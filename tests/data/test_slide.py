"""Slide: a lazy ImageSource over one OpenSlide level."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import tifffile
import torch

from lightstream.core.source import ImageSource
from lightstream.data import Slide, SyntheticSlide, open_slide
from lightstream.data import slide as slide_module


def test_slide_is_an_image_source_of_shape_1_3_h_w(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path) as slide:
        assert isinstance(slide, ImageSource)
        assert slide.shape == (1, 3, 1024, 1536)
        tile = slide.read(slice(10, 50), slice(20, 90))
        assert tile.shape == (1, 3, 40, 70)
        assert tile.dtype == torch.uint8


def test_slide_reports_levels_downsamples_and_mpp(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=2) as slide:
        assert slide.level_shapes == ((1024, 1536), (512, 768), (256, 384), (128, 192))
        assert slide.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert slide.base_mpp == pytest.approx(0.5)
        assert slide.mpp == pytest.approx(2.0)
        assert slide.shape == (1, 3, 256, 384)
        assert slide.properties["openslide.mpp-x"] == "0.5"


@pytest.mark.parametrize(
    ("mpp", "level"),
    [(0.5, 0), (0.51, 0), (0.9, 0), (1.0, 1), (1.04, 1), (3.0, 2), (4.0, 3), (100.0, 3)],
)
def test_mpp_picks_the_coarsest_level_not_coarser_than_the_target(
    lesion_slide: SyntheticSlide, mpp: float, level: int
) -> None:
    with open_slide(lesion_slide.path, mpp=mpp) as slide:
        assert slide.level == level


def test_reads_equal_the_pixels_stored_in_the_tiff(lesion_slide: SyntheticSlide) -> None:
    with tifffile.TiffFile(lesion_slide.path) as tif:
        stored = [page.asarray() for page in tif.pages]
    for level, expected in enumerate(stored):
        with open_slide(lesion_slide.path, level=level) as slide:
            whole = slide.read(slice(None), slice(None))[0].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(whole, expected)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_a_rectangle_reads_the_same_pixels_as_the_matching_part_of_a_larger_read(
    lesion_slide: SyntheticSlide, level: int
) -> None:
    with open_slide(lesion_slide.path, level=level) as slide:
        _, _, height, width = slide.shape
        big = slide.read(slice(0, height), slice(0, width))
        rng = np.random.default_rng(level)
        for _ in range(10):
            r0, c0 = int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))
            r1, c1 = int(rng.integers(r0 + 1, height + 1)), int(rng.integers(c0 + 1, width + 1))
            assert torch.equal(slide.read(slice(r0, r1), slice(c0, c1)), big[:, :, r0:r1, c0:c1])


def test_reads_clamp_like_tensor_slicing_and_reject_strides(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=3) as slide:
        whole = slide.read(slice(None), slice(None))
        assert torch.equal(slide.read(slice(100, 1000), slice(-10, None)), whole[:, :, 100:1000, -10:])
        assert slide.read(slice(50, 50), slice(0, 10)).shape == (1, 3, 0, 10)
        with pytest.raises(ValueError, match="step 2"):
            slide.read(slice(0, 10, 2), slice(0, 10))


def test_non_integer_downsample_reads_depend_only_on_pixel_coordinates(tmp_path, write_tiled_tiff) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1001, 1203, 3), dtype=np.uint8)  # odd sizes: level 1 is 501 x 602
    path = write_tiled_tiff(tmp_path / "odd.tif", [base, base[::2, ::2].copy()])
    with open_slide(path, level=1) as slide:
        assert slide.downsample != 2.0  # OpenSlide: mean of 1001/501 and 1203/602
        whole = slide.read(slice(None), slice(None))
        for r0, c0, size in [(3, 5, 16), (100, 301, 40), (257, 33, 300), (480, 590, 21), (500, 0, 1)]:
            tile = slide.read(slice(r0, r0 + size), slice(c0, c0 + size))
            assert torch.equal(tile, whole[:, :, r0 : r0 + size, c0 : c0 + size])
    with open_slide(path, level=0) as slide:  # integer downsample: exact stored pixels
        np.testing.assert_array_equal(slide.read(slice(7, 90), slice(3, 77))[0].permute(1, 2, 0).numpy(), base[7:90, 3:77])


def test_thumbnail_fits_max_size_and_keeps_the_aspect_ratio(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path) as slide:
        thumbnail = slide.thumbnail(max_size=96)
    assert thumbnail.dtype == np.uint8
    assert thumbnail.shape == (64, 96, 3)


def test_thumbnail_of_a_slide_without_pyramid_is_box_averaged_band_by_band(
    tmp_path, write_tiled_tiff, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (130, 200, 3), dtype=np.uint8)
    path = write_tiled_tiff(tmp_path / "flat.tif", [base])
    monkeypatch.setattr(slide_module, "_THUMBNAIL_BAND_PIXELS", 2000)  # a few rows per band
    with open_slide(path) as slide:
        thumbnail = slide.thumbnail(max_size=50)
    factor = 4  # ceil(200 / 50)
    padded = np.pad(base, ((0, 2), (0, 0), (0, 0)), mode="edge").astype(float)
    expected = np.rint(padded.reshape(33, factor, 50, factor, 3).mean(axis=(1, 3)))
    np.testing.assert_array_equal(thumbnail, expected)


def test_closed_slide_refuses_reads_naming_the_file(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path) as slide:
        pass
    with pytest.raises(ValueError, match="lesion.tif.*closed"):
        slide.read(slice(0, 8), slice(0, 8))


def test_pickled_slide_reopens_the_same_level_with_the_same_pixels(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=1) as slide:
        clone: Slide = pickle.loads(pickle.dumps(slide))
        try:
            assert clone.level == 1
            assert torch.equal(clone.read(slice(5, 70), slice(9, 99)), slide.read(slice(5, 70), slice(9, 99)))
        finally:
            clone.close()


def test_a_background_thread_reads_the_same_pixels_as_the_main_thread(lesion_slide: SyntheticSlide) -> None:
    rectangles = [(slice(r, r + 96), slice(c, c + 128)) for r in range(0, 900, 150) for c in range(0, 1400, 200)]
    with open_slide(lesion_slide.path) as slide:
        expected = [slide.read(rows, cols) for rows, cols in rectangles]
        results: list[torch.Tensor] = []
        prefetcher = threading.Thread(target=lambda: results.extend(slide.read(r, c) for r, c in rectangles))
        prefetcher.start()
        concurrent = [slide.read(rows, cols) for rows, cols in reversed(rectangles)][::-1]
        prefetcher.join()
    assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(concurrent, expected, strict=True))
