"""The tile grid of a :class:`~lightstream.core.geometry.TilePlan` over an image or a slide thumbnail."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from lightstream.core import Box, Tile, TilePlan

from ._axes import figure_and_axes

__all__ = ["plot_tile_grid", "thumbnail", "owned_region"]

logger = logging.getLogger(__name__)

_TILE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
"""Input-box outline colours by (row parity, column parity), so neighbouring tiles differ."""


def thumbnail(image: Any, max_size: int = 1024) -> np.ndarray:
    """A displayable ``[h, w]`` or ``[h, w, C]`` array whose longer side is at most ``max_size``.

    Accepts a ``[B, C, H, W]`` or ``[C, H, W]`` tensor (batch item 0), an ``[H, W]`` or
    ``[H, W, C]`` array or PIL image (e.g. a slide thumbnail), or an object with a
    ``thumbnail(max_size)`` method (a lazy slide). Large images are subsampled by striding;
    float images are rescaled to ``[0, 1]`` for display.
    """
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.dim() == 4:
            tensor = tensor[0]
        if tensor.dim() != 3:
            raise ValueError(f"expected a [B, C, H, W] or [C, H, W] tensor, got {tuple(image.shape)}")
        step = max(1, -(-max(tensor.shape[-2:]) // max_size))
        array = tensor[:, ::step, ::step].permute(1, 2, 0).cpu().numpy()
    elif isinstance(image, np.ndarray) or hasattr(image, "__array_interface__"):
        array = np.asarray(image)
        if array.ndim not in (2, 3):
            raise ValueError(f"expected an [H, W] or [H, W, C] array, got shape {array.shape}")
        step = max(1, -(-max(array.shape[:2]) // max_size))
        array = array[::step, ::step]
    elif callable(getattr(image, "thumbnail", None)):
        return thumbnail(image.thumbnail(max_size), max_size)
    else:
        raise TypeError(f"cannot draw a {type(image).__name__}: give a tensor, an array or a slide")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        array = array[..., :3] if array.shape[-1] > 4 else array.mean(axis=-1)
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return array


def owned_region(tile: Tile, plan: TilePlan) -> Box:
    """The image pixels a tile is responsible for: its output box times the output stride.

    Clipped to the image; these regions partition the part of the image the feature map covers.
    """
    (sy, sx), (height, width) = plan.output_stride, plan.image_size
    out = tile.output
    return Box(out.top * sy, out.left * sx, min(out.bottom * sy, height), min(out.right * sx, width))


def _coverage(spans: tuple[tuple[tuple[int, int], tuple[int, int]], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Segment edges along one axis and how many tiles' input spans cover each segment."""
    edges = np.array(sorted({v for (a, b), _ in spans for v in (a, b)}), dtype=float)
    middles = (edges[:-1] + edges[1:]) / 2
    counts = np.zeros(len(middles))
    for (a, b), _ in spans:
        counts += (middles >= a) & (middles < b)
    return edges, counts


def _corners(boxes: list[Box]) -> np.ndarray:
    """``[N, 4, 2]`` polygon corners ``(x, y)`` of boxes, for one fast ``PolyCollection``."""
    edges = np.array([(b.left, b.top, b.right, b.bottom) for b in boxes], dtype=float).reshape(-1, 4)
    x0, y0, x1, y1 = edges.T
    return np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x1, y1], -1),
                     np.stack([x0, y1], -1)], axis=1)


def plot_tile_grid(
    plan: TilePlan,
    image: Any = None,
    ax: Axes | None = None,
    *,
    highlight: tuple[int, int] | None = None,
    max_size: int = 1024,
) -> Figure:
    """Draw the tiles of ``plan`` over ``image`` (or an empty canvas); returns the figure.

    Every tile's input box (the pixels it reads) is outlined; its owned region (output box
    times output stride, the pixels whose features it produces) is dashed; image
    areas read by more than one tile (the overlap, computed again) are shaded darker the more
    tiles read them. One tile (``highlight``, default the middle one) is drawn boldly.
    The backward recomputes exactly these tiles, so this is also the backward's tiling.

    Args:
        plan: from ``StreamingCNN.plan`` or ``Geometry.plan``.
        image: anything :func:`thumbnail` accepts; it may be smaller than the image (a slide
            thumbnail): it is stretched over the image's pixel coordinates.
        ax: draw on this Axes instead of a new figure.
        highlight: grid index ``(row, col)`` of the tile to emphasise (default: the middle
            tile when there are several).
        max_size: longest side of the displayed image.
    """
    figure, ax = figure_and_axes(ax, (6.0, 6.0))
    height, width = plan.image_size
    if image is not None:
        picture = thumbnail(image, max_size)
        ax.imshow(picture, extent=(0, width, height, 0), cmap="gray" if picture.ndim == 2 else None,
                  interpolation="antialiased")
    else:
        ax.add_patch(Rectangle((0, 0), width, height, facecolor="0.92", edgecolor="none"))

    row_edges, row_counts = _coverage(plan.row_spans)
    col_edges, col_counts = _coverage(plan.col_spans)
    counts = np.ma.masked_less(np.outer(row_counts, col_counts), 2)
    if counts.count():
        ax.pcolormesh(col_edges, row_edges, counts, cmap="Reds", vmin=1, vmax=max(4.0, counts.max()),
                      alpha=0.45, gid="overlap")

    tiles = plan.tiles
    grid = plan.grid
    chosen = highlight if highlight is not None else (grid[0] // 2, grid[1] // 2) if len(tiles) > 1 else None
    owned = [owned_region(t, plan) for t in tiles]
    colors = [_TILE_COLORS[2 * (t.index[0] % 2) + t.index[1] % 2] for t in tiles]
    ax.add_collection(PolyCollection(_corners([t.input for t in tiles]), facecolors="none", edgecolors=colors,
                                     linewidths=0.8, alpha=0.9, gid="input-boxes"))
    ax.add_collection(PolyCollection(_corners(owned), facecolors="none", edgecolors="black", linewidths=0.6,
                                     linestyles="--", alpha=0.7, gid="owned-regions"))
    for tile, region in zip(tiles, owned):
        if tile.index == chosen:
            box = tile.input
            ax.add_patch(Rectangle((box.left, box.top), box.width, box.height, facecolor="none",
                                   edgecolor="black", linewidth=2.0, gid="highlight-input"))
            ax.add_patch(Rectangle((region.left, region.top), region.width, region.height,
                                   facecolor="yellow", alpha=0.35, edgecolor="black", linewidth=1.0,
                                   hatch="//", gid="highlight-owned"))

    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("image x (px)")
    ax.set_ylabel("image y (px)")
    handles = [
        Patch(facecolor="none", edgecolor="tab:blue", label="tile input (read)"),
        Patch(facecolor="none", edgecolor="black", linestyle="--", label="owned region (valid output)"),
        Patch(facecolor="tab:red", alpha=0.45, label="overlap (recomputed)"),
    ]
    if chosen is not None:
        handles.append(Patch(facecolor="yellow", alpha=0.35, edgecolor="black", hatch="//",
                             label=f"tile {chosen}: input and owned region"))
    ax.legend(handles=handles, loc="upper right", fontsize="x-small", framealpha=0.85)
    th, tw = plan.tile_size
    tiles_text = f"{len(plan)} tile{'s' if len(plan) > 1 else ''}"
    ax.set_title(f"{tiles_text} ({grid[0]}×{grid[1]}) of ≤{th}×{tw} px, "
                 f"pixels read ×{plan.recompute_factor:.2f}\n"
                 "forward and backward use the same tiles", fontsize="medium")
    logger.debug("drew %d tiles over a %dx%d image", len(tiles), height, width)
    return figure
