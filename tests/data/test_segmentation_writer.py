"""SegmentationWriter: a label map written block by block as a pyramidal TIFF that OpenSlide opens."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch

from lightstream.data import SegmentationWriter, label_pyramid_shapes, write_segmentation


def _labels(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6, shape).astype(np.uint8)


def _blocks_in_random_order(labels: np.ndarray, size: tuple[int, int], seed: int = 0) -> list[tuple[slice, slice]]:
    height, width = labels.shape
    blocks = [
        (slice(top, min(top + size[0], height)), slice(left, min(left + size[1], width)))
        for top in range(0, height, size[0])
        for left in range(0, width, size[1])
    ]
    order = np.random.default_rng(seed).permutation(len(blocks))
    return [blocks[index] for index in order]


def test_openslide_reads_the_map_exactly_at_level_0_and_every_level_is_nearest_downsampling(tmp_path: Path) -> None:
    labels = _labels((700, 900))  # not a multiple of the tile: edge tiles and odd level sizes
    blocks = _blocks_in_random_order(labels, (130, 110))  # blocks straddle tiles, arrive in any order
    blocks_of_labels = ((rows, cols, labels[rows, cols]) for rows, cols in blocks)
    path = write_segmentation(tmp_path / "seg.tif", blocks_of_labels, labels.shape, tile=64, mpp=0.5)
    shapes = label_pyramid_shapes(700, 900, 64)
    assert shapes == [(700, 900), (350, 450), (175, 225), (88, 113), (44, 57)]
    with openslide.OpenSlide(path) as raw:
        assert raw.level_count == 5
        assert raw.level_dimensions == tuple((width, height) for height, width in shapes)
        assert float(raw.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        for level, (height, width) in enumerate(shapes):
            rgba = np.asarray(raw.read_region((0, 0), level, (width, height)))
            np.testing.assert_array_equal(rgba[..., 0], labels[:: 2**level, :: 2**level])
            assert (rgba[..., 0] == rgba[..., 2]).all() and (rgba[..., 3] == 255).all()
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == shapes
        for level, stored in enumerate(levels):
            np.testing.assert_array_equal(stored.asarray(), labels[:: 2**level, :: 2**level])
        assert json.loads(tif.pages[0].description)["generator"] == "lightstream.data.segmentation_writer"


def test_later_blocks_overwrite_earlier_ones_and_unwritten_pixels_read_as_fill(tmp_path: Path) -> None:
    with SegmentationWriter(tmp_path / "seg.tif", (100, 120), tile=32, fill=7) as writer:
        writer.write(slice(10, 60), slice(20, 90), np.full((50, 70), 1, np.uint8))
        writer.write(slice(40, 50), slice(0, 40), torch.full((1, 1, 10, 40), 2))  # a [1, 1, h, w] tensor
    expected = np.full((100, 120), 7, np.uint8)
    expected[10:60, 20:90] = 1
    expected[40:50, 0:40] = 2
    np.testing.assert_array_equal(tifffile.imread(writer.path), expected)


def test_an_exception_inside_the_block_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="prediction failed"):
        with SegmentationWriter(tmp_path / "seg.tif", (64, 64), tile=32) as writer:
            writer.write(slice(0, 32), slice(0, 32), np.ones((32, 32), np.uint8))
            raise RuntimeError("prediction failed")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("labels", "rows", "cols", "words"),
    [
        (np.zeros((8, 8), np.float32), slice(0, 8), slice(0, 8), "integer class indices"),
        (np.full((8, 8), 300), slice(0, 8), slice(0, 8), r"0\.\.255"),
        (np.zeros((8, 8), np.uint8), slice(0, 8), slice(0, 9), "does not fit"),
        (np.zeros((8, 8), np.uint8), slice(60, 68), slice(0, 8), "does not fit"),
        (np.zeros((2, 8, 8), np.uint8), slice(0, 8), slice(0, 8), r"\[h, w\]"),
    ],
)
def test_blocks_that_are_not_labels_or_do_not_fit_are_refused(
    tmp_path: Path, labels: np.ndarray, rows: slice, cols: slice, words: str
) -> None:
    writer = SegmentationWriter(tmp_path / "seg.tif", (64, 64), tile=32)
    with pytest.raises(ValueError, match=words):
        writer.write(rows, cols, labels)
    writer.discard()


def test_an_existing_file_is_refused_before_any_block_is_written(tmp_path: Path) -> None:
    (tmp_path / "seg.tif").write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        SegmentationWriter(tmp_path / "seg.tif", (64, 64))


def _striped_blocks(size: int, block: int) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Blocks of a ``size``-square label map made on the fly (diagonal stripes of 3 labels)."""
    for top in range(0, size, block):
        for left in range(0, size, block):
            rows = (np.arange(top, top + block, dtype=np.int32) // 97)[:, None]
            cols = (np.arange(left, left + block, dtype=np.int32) // 89)[None, :]
            yield slice(top, top + block), slice(left, left + block), ((rows + cols) % 3).astype(np.uint8)


def test_writing_an_8192_square_map_in_512_px_blocks_never_allocates_the_whole_map(tmp_path: Path) -> None:
    size = 8192
    tracemalloc.start()
    try:
        path = write_segmentation(tmp_path / "big.tif", _striped_blocks(size, 512), (size, size))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size * size / 16, f"peak {peak / 2**20:.1f} MiB for a {size * size / 2**20:.0f} MiB map"
    with openslide.OpenSlide(path) as raw:
        assert raw.level_dimensions[0] == (size, size) and raw.level_count == len(label_pyramid_shapes(size, size, 256))
        corner = np.asarray(raw.read_region((8000, 7900), 0, (150, 200)))[..., 0]
        rows, cols = np.arange(7900, 8100)[:, None] // 97, np.arange(8000, 8150)[None, :] // 89
        np.testing.assert_array_equal(corner, (rows + cols) % 3)
