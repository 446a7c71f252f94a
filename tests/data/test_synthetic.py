"""Synthetic slides: pyramidal tiled TIFFs OpenSlide reads, deterministic, with lesions only at full resolution."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from lightstream.data import (
    SlideDataset,
    SyntheticSlide,
    open_slide,
    read_mask,
    read_slide_table,
    write_synthetic_dataset,
    write_synthetic_slide,
)


def _pixels(path: Path, level: int = 0) -> np.ndarray:
    with open_slide(path, level=level) as slide:
        return slide.read(slice(None), slice(None))[0].permute(1, 2, 0).numpy()


def test_openslide_reads_the_pyramid_and_its_mpp(lesion_slide: SyntheticSlide) -> None:
    with openslide.OpenSlide(lesion_slide.path) as raw:
        assert raw.properties["openslide.vendor"] == "generic-tiff"
        assert float(raw.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(raw.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert raw.level_dimensions == ((1536, 1024), (768, 512), (384, 256), (192, 128))
        assert raw.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        description = json.loads(raw.properties["tiff.ImageDescription"])
    assert description["seed"] == 3
    assert len(description["lesions"]) == 2
    assert lesion_slide.level_shapes == ((1024, 1536), (512, 768), (256, 384), (128, 192))


def test_pyramid_stops_at_odd_sizes_so_every_downsample_is_a_power_of_two(tmp_path: Path) -> None:
    info = write_synthetic_slide(tmp_path / "odd.tif", size=(600, 1000), tile=64)
    assert info.level_shapes == ((600, 1000), (300, 500), (150, 250), (75, 125))  # 75 x 125 > 64 but odd
    with openslide.OpenSlide(info.path) as raw:
        assert raw.level_downsamples == (1.0, 2.0, 4.0, 8.0)


def test_same_seed_gives_the_same_pixels_and_another_seed_different_ones(tmp_path: Path) -> None:
    first = write_synthetic_slide(tmp_path / "a.tif", size=(512, 512), lesions=1, seed=7)
    again = write_synthetic_slide(tmp_path / "b.tif", size=(512, 512), lesions=1, seed=7)
    other = write_synthetic_slide(tmp_path / "c.tif", size=(512, 512), lesions=1, seed=8)
    assert first.lesions == again.lesions != other.lesions
    np.testing.assert_array_equal(_pixels(first.path), _pixels(again.path))
    assert not np.array_equal(_pixels(first.path), _pixels(other.path))


def test_content_is_a_function_of_coordinates_so_the_tile_size_does_not_matter(tmp_path: Path) -> None:
    # Each tile is rendered on its own; identical pixels across tile grids prove tiles never see each other.
    small = write_synthetic_slide(tmp_path / "t64.tif", size=(384, 320), lesions=2, seed=1, tile=64, compression="zlib")
    large = write_synthetic_slide(tmp_path / "t256.tif", size=(384, 320), lesions=2, seed=1, tile=256, compression="zlib")
    np.testing.assert_array_equal(_pixels(small.path), _pixels(large.path))
    np.testing.assert_array_equal(_pixels(small.path, level=1), _pixels(large.path, level=1))


def test_lesions_lie_in_tissue_and_are_dark_at_full_resolution_but_not_at_8x(lesion_slide: SyntheticSlide) -> None:
    levels = {level: _pixels(lesion_slide.path, level).astype(float).mean(axis=2) for level in (0, 3)}
    for lesion in lesion_slide.lesions:
        assert 0 <= lesion.center_y < 1024 and 0 <= lesion.center_x < 1536
        darkest = {}
        for level, luminance in levels.items():
            scale = 2**level
            y, x, r = (int(v / scale) for v in (lesion.center_y, lesion.center_x, lesion.radius))
            darkest[level] = luminance[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1].min()
        assert darkest[0] < 110, "nuclei are dark at level 0"
        assert darkest[3] > 130, "nuclei fade away at 8x"


def test_slide_without_lesions_has_no_dark_nuclei(plain_slide: SyntheticSlide) -> None:
    assert plain_slide.lesions == () and plain_slide.label == 0
    assert _pixels(plain_slide.path).astype(float).mean(axis=2).min() > 110


def test_dataset_writer_makes_a_balanced_labelled_table_with_matching_masks(tmp_path: Path) -> None:
    records = write_synthetic_dataset(tmp_path / "set", n=4, size=(512, 384), seed=2, masks=True, mask_downsample=16)
    assert sorted(record.label for record in records) == [0, 0, 1, 1]
    with (tmp_path / "set" / "labels.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == [f"slide_{i:03d}.tif" for i in range(4)]  # relative: the folder can move
    assert read_slide_table(tmp_path / "set" / "labels.csv") == records
    for record in records:
        assert record.mask_path is not None
        with open_slide(record.path) as slide:
            mask = read_mask(record.mask_path, slide)
            assert mask.shape == (32, 24)
            assert set(np.unique(mask)) <= {0, 255}
    assert len(SlideDataset(tmp_path / "set" / "labels.csv")) == 4


def test_dataset_writer_refuses_to_overwrite_an_existing_table(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, n=1, size=(128, 128))
    with pytest.raises(FileExistsError, match="labels.csv"):
        write_synthetic_dataset(tmp_path, n=1, size=(128, 128))
