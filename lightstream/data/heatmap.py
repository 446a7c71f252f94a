"""Place a feature map or saliency map on a slide thumbnail (array math only; plotting is in ``lightstream.viz``)."""

from __future__ import annotations

import numpy as np
import torch

from lightstream.data.geometry import Box
from lightstream.data.slide import Slide

__all__ = ["reduce_channels", "heatmap_on_thumbnail", "slide_heatmap"]


def reduce_channels(values: torch.Tensor | np.ndarray, reduce: str | int = "mean") -> np.ndarray:
    """A ``[h, w]`` float32 array from a ``[h, w]``, ``[C, h, w]`` or ``[1, C, h, w]`` map.

    ``reduce`` picks how channels become one value: ``"mean"``, ``"max"``, ``"norm"`` (L2 over
    channels), or an int selecting one channel.
    """
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected a single map, got a batch of {array.shape[0]}")
        array = array[0]
    if array.ndim == 2:
        return array.astype(np.float32)
    if array.ndim != 3:
        raise ValueError(f"expected a [h, w], [C, h, w] or [1, C, h, w] map, got shape {array.shape}")
    array = array.astype(np.float32)
    if isinstance(reduce, int):
        return array[reduce]
    if reduce == "mean":
        return array.mean(axis=0)
    if reduce == "max":
        return array.max(axis=0)
    if reduce == "norm":
        return np.sqrt((array**2).sum(axis=0))
    raise ValueError(f"reduce must be 'mean', 'max', 'norm' or a channel index, got {reduce!r}")


def heatmap_on_thumbnail(
    values: torch.Tensor | np.ndarray,
    output_stride: float,
    level_downsample: float,
    slide_shape: tuple[int, int],
    thumbnail_shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    reduce: str | int = "mean",
) -> np.ndarray:
    """Resample a map computed on one slide level onto a thumbnail's pixel grid.

    Feature cell ``(i, j)`` covers the level pixels ``origin + (i, j) * output_stride`` up to the
    next cell; a level pixel covers ``level_downsample`` level-0 pixels; the thumbnail spans level
    0 (``slide_shape = (H0, W0)``) with ``thumbnail_shape = (h, w)`` pixels. Every thumbnail pixel
    takes the value of the cell under its centre (nearest neighbour), or NaN where no cell lies.

    Args:
        values: ``[h, w]`` / ``[C, h, w]`` / ``[1, C, h, w]`` map (see :func:`reduce_channels`).
        output_stride: level pixels per feature cell (the engine's output stride).
        level_downsample: level-0 pixels per pixel of the level the map was computed on.
        slide_shape: ``(height, width)`` of level 0.
        thumbnail_shape: ``(height, width)`` of the thumbnail to align to.
        origin: level pixel ``(row, col)`` where cell ``(0, 0)`` starts, e.g. the top-left of the
            crop box the engine streamed.
        reduce: channel reduction (see :func:`reduce_channels`).

    Returns:
        float32 ``[thumbnail height, thumbnail width]`` heatmap, NaN outside the map.
    """
    grid = reduce_channels(values, reduce)
    rows = _cells_under(thumbnail_shape[0], slide_shape[0], level_downsample, origin[0], output_stride)
    cols = _cells_under(thumbnail_shape[1], slide_shape[1], level_downsample, origin[1], output_stride)
    valid_rows = (rows >= 0) & (rows < grid.shape[0])
    valid_cols = (cols >= 0) & (cols < grid.shape[1])
    heatmap = np.full(thumbnail_shape, np.nan, dtype=np.float32)
    heatmap[np.ix_(valid_rows, valid_cols)] = grid[np.ix_(rows[valid_rows], cols[valid_cols])]
    return heatmap


def slide_heatmap(
    values: torch.Tensor | np.ndarray,
    slide: Slide,
    output_stride: float,
    box: Box | None = None,
    thumbnail_size: int = 1024,
    reduce: str | int = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """``(thumbnail, heatmap)`` of a map the engine computed on ``slide`` (or on ``slide.crop(box)``).

    The map must be in the slide's orientation (compute saliency on an un-augmented view).
    """
    thumbnail = slide.thumbnail(thumbnail_size)
    origin = (box.top, box.left) if box is not None else (0, 0)
    heatmap = heatmap_on_thumbnail(
        values, output_stride, slide.downsample, slide.level_shapes[0], thumbnail.shape[:2], origin, reduce
    )
    return thumbnail, heatmap


def _cells_under(pixels: int, slide_extent: int, level_downsample: float, origin: float, stride: float) -> np.ndarray:
    """Index of the feature cell under the centre of each thumbnail pixel along one axis."""
    level_coordinate = (np.arange(pixels) + 0.5) * (slide_extent / pixels) / level_downsample
    return np.floor((level_coordinate - origin) / stride).astype(np.int64)
