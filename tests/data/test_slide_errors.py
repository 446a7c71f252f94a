"""Every failure of the data layer raises a clear, catchable error naming the file at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lightstream.data import (
    MaskMismatchError,
    SlideDataset,
    SlideError,
    SlideLevelError,
    SlideNotFoundError,
    SlideRecord,
    SyntheticSlide,
    UnsupportedSlideError,
    open_slide,
    read_mask,
    read_slide_table,
    write_synthetic_slide,
)


def test_missing_slide_raises_file_not_found_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.svs"
    with pytest.raises(FileNotFoundError, match="nowhere.svs") as info:
        open_slide(missing)
    assert isinstance(info.value, SlideNotFoundError)
    assert info.value.path == missing


def test_directory_is_rejected_as_not_a_slide_file(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSlideError, match=f"{tmp_path}.*not a file"):
        open_slide(tmp_path)


def test_png_is_unsupported_with_a_message_naming_file_and_alternatives(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="photo.png.*does not recognise its format") as info:
        open_slide(path)
    assert isinstance(info.value, UnsupportedSlideError)
    assert isinstance(info.value, SlideError)


def test_untiled_tiff_is_unsupported_with_a_conversion_hint(tmp_path: Path) -> None:
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UnsupportedSlideError, match="strips.tif.*only tiled TIFFs"):
        open_slide(path)


def test_corrupt_file_is_unsupported_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(UnsupportedSlideError, match="corrupt.tif"):
        open_slide(path)


@pytest.mark.parametrize("level", [4, -1, 1.5])
def test_level_out_of_range_names_file_and_valid_levels(lesion_slide: SyntheticSlide, level: object) -> None:
    with pytest.raises(SlideLevelError, match=r"lesion.tif.*4 level\(s\), 0..3") as info:
        open_slide(lesion_slide.path, level=level)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_mpp_finer_than_level_zero_is_out_of_range(lesion_slide: SyntheticSlide) -> None:
    with pytest.raises(SlideLevelError, match=r"mpp=0.25 is out of range for .*lesion.tif.*finest level has 0.5"):
        open_slide(lesion_slide.path, mpp=0.25)


@pytest.mark.parametrize("mpp", [0.0, -1.0, float("nan")])
def test_non_positive_mpp_is_rejected(lesion_slide: SyntheticSlide, mpp: float) -> None:
    with pytest.raises(SlideLevelError, match="lesion.tif"):
        open_slide(lesion_slide.path, mpp=mpp)


def test_mpp_on_a_slide_without_resolution_metadata_asks_for_a_level(tmp_path: Path, write_tiled_tiff) -> None:
    path = write_tiled_tiff(tmp_path / "nompp.tif", [np.zeros((64, 64, 3), np.uint8)], mpp=None)
    with open_slide(path) as slide:
        assert slide.mpp is None
    with pytest.raises(SlideLevelError, match="nompp.tif stores no resolution.*pass level="):
        open_slide(path, mpp=1.0)


def test_level_and_mpp_together_are_rejected(lesion_slide: SyntheticSlide) -> None:
    with pytest.raises(ValueError, match="lesion.tif.*either level= or mpp="):
        open_slide(lesion_slide.path, level=1, mpp=1.0)


def test_missing_mask_raises_file_not_found_naming_mask_and_slide(tmp_path: Path, lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path) as slide, pytest.raises(FileNotFoundError, match="gone_mask.png.*lesion.tif"):
        read_mask(tmp_path / "gone_mask.png", slide)


def test_unreadable_mask_is_unsupported_naming_the_mask(tmp_path: Path, lesion_slide: SyntheticSlide) -> None:
    path = tmp_path / "mask.png"
    path.write_bytes(b"not a png")
    with open_slide(lesion_slide.path) as slide, pytest.raises(UnsupportedSlideError, match="mask.png"):
        read_mask(path, slide)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((64, 64), "aspect ratios differ"), ((128, 100), "aspect ratios differ"), ((2048, 3072), "larger than")],
)
def test_mask_that_does_not_match_the_slide_names_both_files(
    tmp_path: Path, lesion_slide: SyntheticSlide, shape: tuple[int, int], reason: str
) -> None:
    path = tmp_path / "roi.tif"
    tifffile.imwrite(path, np.ones(shape, np.uint8))
    with open_slide(lesion_slide.path) as slide, pytest.raises(MaskMismatchError, match=f"roi.tif.*lesion.tif.*{reason}") as info:
        read_mask(path, slide)
    assert isinstance(info.value, ValueError)
    assert info.value.slide_path == lesion_slide.path


@pytest.mark.parametrize("shape", [(64, 96), (65, 96), (11, 16), (1024, 1536)])
def test_masks_of_any_uniform_downsample_match(tmp_path: Path, lesion_slide: SyntheticSlide, shape: tuple[int, int]) -> None:
    path = tmp_path / "roi.png"
    Image.fromarray(np.full(shape, 255, np.uint8)).save(path)
    with open_slide(lesion_slide.path) as slide:
        assert read_mask(path, slide).shape == shape


def test_writer_refuses_to_overwrite_an_existing_file_and_leaves_it_intact(tmp_path: Path) -> None:
    path = tmp_path / "precious.tif"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="precious.tif"):
        write_synthetic_slide(path, size=(256, 256))
    assert path.read_bytes() == b"user data"


def test_table_without_a_label_column_names_the_file(tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("path,target\na.tif,1\n")
    with pytest.raises(ValueError, match=r"slides.csv lacks column\(s\) \['label'\]"):
        read_slide_table(table)


def test_table_with_a_non_numeric_label_names_file_and_line(tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("path,label\na.tif,1\nb.tif,tumour\n")
    with pytest.raises(ValueError, match="slides.csv, line 3: label 'tumour'"):
        read_slide_table(table)


def test_missing_table_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        read_slide_table(tmp_path / "labels.csv")


def test_dataset_reports_a_missing_slide_by_name(tmp_path: Path) -> None:
    dataset = SlideDataset([SlideRecord(tmp_path / "absent.tif", 1)])
    with pytest.raises(SlideNotFoundError, match="absent.tif"):
        dataset[0]
