"""Hostile inputs to the data layer: damaged slide files and nonsense tissue arguments get clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from lightstream.data import (
    SlideDataset,
    SlideRecord,
    SyntheticSlide,
    UnsupportedSlideError,
    mask_box,
    open_slide,
    tissue_box,
    tissue_mask,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 512 x 768 BigTIFF pyramid (4 levels, 128 px tiles) whose directories lie between the levels' data."""
    path = tmp_path_factory.mktemp("hostile") / "small.tif"
    return write_synthetic_slide(path, size=(512, 768), tile=128, compression="zlib")


def _cut(source: Path, destination: Path, fraction: float) -> Path:
    data = source.read_bytes()
    destination.write_bytes(data[: int(len(data) * fraction)])
    return destination


# ------------------------------------------------------------------------------ damaged slide files
@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.5, 0.9, 0.999])
def test_a_truncated_tiled_tiff_is_reported_as_truncated_or_corrupt_not_as_untiled(
    small_slide: SyntheticSlide, tmp_path: Path, fraction: float
) -> None:
    path = _cut(small_slide.path, tmp_path / "cut.tif", fraction)
    with pytest.raises(UnsupportedSlideError, match=r"cut\.tif as a slide: the file is truncated or corrupt") as info:
        open_slide(path)
    assert "only tiled TIFFs" not in str(info.value)
    assert info.value.path == path


def test_the_truncation_message_says_where_the_structure_runs_past_the_end(
    small_slide: SyntheticSlide, tmp_path: Path
) -> None:
    path = _cut(small_slide.path, tmp_path / "half.tif", 0.5)
    size = path.stat().st_size
    with pytest.raises(UnsupportedSlideError, match=f"past its end at byte {size}"):
        open_slide(path)


def test_a_truncated_classic_tiff_is_truncated_or_corrupt(tmp_path: Path) -> None:
    full = tmp_path / "classic.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(full, pixels, tile=(64, 64), photometric="rgb", compression="zlib")
    with pytest.raises(UnsupportedSlideError, match=r"classic-cut\.tif.*truncated or corrupt"):
        open_slide(_cut(full, tmp_path / "classic-cut.tif", 0.5))


def test_an_empty_file_is_called_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.touch()
    with pytest.raises(UnsupportedSlideError, match=r"empty\.svs as a slide: the file is empty \(truncated or corrupt"):
        open_slide(path)


def test_an_intact_untiled_tiff_still_gets_the_tiling_hint(tmp_path: Path) -> None:
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UnsupportedSlideError, match="only tiled TIFFs") as info:
        open_slide(path)
    assert "truncated" not in str(info.value)


def test_a_slide_whose_data_is_missing_after_an_intact_header_fails_at_read_as_truncated(
    small_slide: SyntheticSlide, tmp_path: Path
) -> None:
    """The directories are whole but level 0's tiles point past the end: the file opens (OpenSlide
    checks the smallest level) and reading a tile raises, naming the file."""
    path = tmp_path / "hollow.tif"
    path.write_bytes(small_slide.path.read_bytes())
    size = path.stat().st_size
    with tifffile.TiffFile(path, mode="r+b") as tif:
        offsets = tif.pages[0].tags["TileOffsets"]
        offsets.overwrite(tuple(int(offset) + size for offset in offsets.value))
    with open_slide(path) as slide, pytest.raises(
        UnsupportedSlideError, match=r"pixels of .*hollow\.tif at level 0: the file is truncated or corrupt"
    ):
        slide.read(slice(0, 64), slice(0, 64))


def test_corrupt_tile_bytes_fail_at_read_as_truncated_or_corrupt(small_slide: SyntheticSlide, tmp_path: Path) -> None:
    path = tmp_path / "garbled.tif"
    data = bytearray(small_slide.path.read_bytes())
    with tifffile.TiffFile(small_slide.path) as tif:
        start, length = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data[start : start + length] = bytes(length)
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert slide.read(slice(256, 320), slice(640, 704)).shape == (1, 3, 64, 64)  # an intact tile reads
        with pytest.raises(UnsupportedSlideError, match=r"garbled\.tif at level 0: the file is truncated or corrupt"):
            slide.read(slice(0, 64), slice(0, 64))


@pytest.mark.parametrize("max_size", [0, -5, 2.5, True])
def test_a_thumbnail_size_that_is_not_a_positive_integer_is_refused(small_slide: SyntheticSlide, max_size) -> None:
    with open_slide(small_slide.path) as slide, pytest.raises(ValueError, match="max_size must be a positive integer"):
        slide.thumbnail(max_size)


# ---------------------------------------------------------------------------------- tissue arguments
@pytest.mark.parametrize("margin", [-(10**9), -1, float("nan"), 2.5, True, "8"])
def test_a_tissue_margin_that_is_not_a_non_negative_integer_is_refused(margin) -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    with pytest.raises(ValueError, match=r"margin must be a non-negative integer .*got " + repr(margin).replace("(", r"\(")):
        mask_box(mask, (800, 800), margin)


def test_numpy_integer_margins_are_accepted() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    assert mask_box(mask, (800, 800), np.int64(10)) == mask_box(mask, (800, 800), 10)


def test_tissue_box_refuses_a_bad_margin_before_reading_the_thumbnail(small_slide: SyntheticSlide,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(small_slide.path) as slide:
        monkeypatch.setattr(slide, "thumbnail", lambda *args: pytest.fail("the thumbnail was read"))
        with pytest.raises(ValueError, match="margin must be a non-negative integer"):
            tissue_box(slide, margin=-(10**9))


def test_a_dataset_with_a_huge_negative_tissue_margin_names_the_margin(small_slide: SyntheticSlide) -> None:
    dataset = SlideDataset([SlideRecord(small_slide.path, 1)], tissue_margin=-(10**9))
    with pytest.raises(ValueError, match="margin must be a non-negative integer"):
        dataset[0]


@pytest.mark.parametrize(("options", "message"), [
    ({"min_saturation": 1.5}, "min_saturation must be a number between 0 and 1, got 1.5"),
    ({"min_saturation": float("nan")}, "min_saturation must be a number between 0 and 1, got nan"),
    ({"smoothing": 0}, "smoothing must be a positive integer"),
    ({"smoothing": 2.5}, "smoothing must be a positive integer"),
])
def test_tissue_detection_refuses_nonsense_thresholds_naming_the_argument(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        tissue_mask(np.zeros((8, 8, 3), np.uint8), **options)
