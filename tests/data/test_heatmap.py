"""Heatmaps: feature maps placed on the thumbnail grid from level, downsample and output stride."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightstream.data import Box, SyntheticSlide, heatmap_on_thumbnail, open_slide, reduce_channels, slide_heatmap


def test_each_feature_cell_covers_its_block_of_thumbnail_pixels() -> None:
    values = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    # level 1 of a 1024 x 1536 slide, stride 128 level px = 256 level-0 px = 16 thumbnail px (thumbnail 64 x 96)
    heatmap = heatmap_on_thumbnail(values, output_stride=128, level_downsample=2.0, slide_shape=(1024, 1536), thumbnail_shape=(64, 96))
    np.testing.assert_array_equal(heatmap, np.kron(values.numpy(), np.ones((16, 16), np.float32)))


def test_cells_start_at_the_origin_of_the_streamed_crop_and_nan_marks_uncovered_pixels() -> None:
    values = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    heatmap = heatmap_on_thumbnail(
        values, output_stride=64, level_downsample=2.0, slide_shape=(1024, 1536), thumbnail_shape=(64, 96), origin=(128, 64)
    )
    # cell (i, j) covers level-0 rows 256 + 128 i .. and cols 128 + 128 j .., i.e. 8 x 8 thumbnail px from (16, 8)
    expected = np.full((64, 96), np.nan, np.float32)
    expected[16:32, 8:32] = np.kron(values, np.ones((8, 8)))
    np.testing.assert_array_equal(heatmap, expected)


def test_feature_map_finer_than_the_thumbnail_is_sampled_at_pixel_centres() -> None:
    values = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    heatmap = heatmap_on_thumbnail(values, output_stride=1, level_downsample=1.0, slide_shape=(16, 16), thumbnail_shape=(4, 4))
    np.testing.assert_array_equal(heatmap, values[2::4, 2::4])


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [("mean", [[2.0]]), ("max", [[4.0]]), ("norm", [[np.sqrt(20.0)]]), (1, [[4.0]])],
)
def test_channels_reduce_by_mean_max_norm_or_index(reduce: str | int, expected: list[list[float]]) -> None:
    fmap = torch.tensor([[[0.0]], [[4.0]], [[2.0]]])[None]  # [1, 3, 1, 1]
    np.testing.assert_allclose(reduce_channels(fmap, reduce), expected, rtol=1e-6)


def test_reduce_rejects_batches_and_unknown_reductions() -> None:
    with pytest.raises(ValueError, match="batch of 2"):
        reduce_channels(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="'median'"):
        reduce_channels(torch.zeros(3, 4, 4), "median")


def test_slide_heatmap_is_aligned_with_the_slide_thumbnail(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=1) as slide:
        box = Box(64, 128, 320, 512)
        thumbnail, heatmap = slide_heatmap(torch.ones(1, 4, 8, 12), slide, output_stride=32, box=box, thumbnail_size=192)
    assert thumbnail.shape == (128, 192, 3)
    assert heatmap.shape == (128, 192)
    covered = ~np.isnan(heatmap)
    rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    # box in level-0 px: rows 128..640, cols 256..1024; thumbnail px are 8 level-0 px
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (16, 80, 32, 128)
