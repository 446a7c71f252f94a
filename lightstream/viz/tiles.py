"""The tile grid of a :class:`~lightstream.core.geometry.TilePlan` over an image or a slide thumbnail."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from lightstream.core import Box, Tile, TilePlan

from ._axes import NOTEBOOK_WIDTH, styled

__all__ = ["owned_region", "plot_tile_grid", "thumbnail"]

logger = logging.getLogger(__name__)

_TILE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
"""Input-box outline colours by (row parity, column parity), so neighbouring tiles differ."""
_HALO = "tab:orange"
_OWNED = "tab:green"
_MAX_PER_SIDE = 32
"""More tiles than this along a side and their outlines would form a plaid: draw a subset."""
_DRAWN_PER_SIDE = 12
_MIN_ZOOM = 12
"""The zoom shows at least this many px on each side of the highlighted tile's corner."""


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


@styled
def plot_tile_grid(
    plan: TilePlan,
    image: Any = None,
    ax: Axes | None = None,
    *,
    highlight: tuple[int, int] | None = None,
    max_size: int = 1024,
    zoom: bool | None = None,
    legend: bool = True,
) -> Figure:
    """Draw the tiles of ``plan`` over ``image`` (or an empty canvas); returns the figure.

    Every tile's input box (the pixels it reads) is outlined; its owned region (output box
    times output stride, the pixels whose features it produces) is dashed; image areas read by
    more than one tile (the overlap, computed again) are shaded darker the more tiles read them.
    One tile (``highlight``, default the middle one) is filled: its halo (read for its borders,
    not owned) in orange around its owned region in green. Overlaps of a few pixels vanish at
    the scale of the image, so a new figure has a second panel zoomed on that tile and its
    neighbours. When there are so many tiles that their outlines would form a plaid (more than
    32 per side), only every k-th tile is outlined (the key says which). The backward
    recomputes exactly these tiles, so this is also the backward's tiling.

    Args:
        plan: from ``StreamingCNN.plan`` or ``Geometry.plan``.
        image: anything :func:`thumbnail` accepts; it may be smaller than the image (a slide
            thumbnail): it is stretched over the image's pixel coordinates.
        ax: draw on this Axes instead of a new figure.
        highlight: grid index ``(row, col)`` of the tile to emphasise (default: the middle
            tile when there are several).
        max_size: longest side of the displayed image.
        zoom: draw the zoomed view of the highlighted tile: a side panel on a new figure, an
            inset on a given ``ax``. Default: on a new figure only (and only with several tiles).
        legend: draw the key (below a new figure, inside a given ``ax``); a host that keys the
            marks itself (a compact widget) can leave it out.
    """
    if highlight is not None and not all(0 <= i < n for i, n in zip(highlight, plan.grid)):
        raise ValueError(f"highlight {highlight} is outside the {plan.grid[0]}×{plan.grid[1]} tile grid "
                         "(give a (row, col) index of a tile)")
    tiles = plan.tiles
    chosen = highlight if highlight is not None else (
        (plan.grid[0] // 2, plan.grid[1] // 2) if len(tiles) > 1 else None)
    narrow = ax is not None   # a given Axes: the title takes three lines
    zoom = (ax is None) if zoom is None else zoom
    zoom = zoom and chosen is not None
    if ax is None:
        figure = Figure(figsize=(NOTEBOOK_WIDTH, 6.2) if zoom else (6.0, 6.4), layout="constrained")
        if zoom:
            ax, zoom_ax = figure.subplots(1, 2, width_ratios=(1.3, 1))
        else:
            ax, zoom_ax = figure.add_subplot(), None
    else:
        figure = ax.get_figure(root=True)
        zoom_ax = ax.inset_axes((0.52, 0.02, 0.46, 0.46)) if zoom else None
    picture = thumbnail(image, max_size) if image is not None else None
    step = -(-max(plan.grid) // _DRAWN_PER_SIDE) if max(plan.grid) > _MAX_PER_SIDE else 1
    handles = _draw_tiles(ax, plan, picture, chosen, step)
    height, width = plan.image_size
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xlabel("image x (px)")
    ax.set_ylabel("image y (px)")
    th, tw = plan.tile_size
    tiles_text = f"{len(plan)} tile{'s' if len(plan) > 1 else ''}"
    separator = "\n" if narrow else ", "
    ax.set_title(f"{tiles_text} ({plan.grid[0]}×{plan.grid[1]}) of ≤{th}×{tw} px{separator}"
                 f"pixels read ×{plan.recompute_factor:.2f}\nforward and backward use the same tiles")
    if zoom_ax is not None and chosen is not None:
        _draw_tiles(zoom_ax, plan, picture, chosen, 1, zoomed=True)
        left, top, right, bottom = _zoom_window(plan, chosen)
        zoom_ax.set_xlim(left, right)
        zoom_ax.set_ylim(bottom, top)
        zoom_ax.set_gid("zoom")
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, facecolor="none", edgecolor="black",
                               linewidth=1.5, gid="zoom-area"))
        handles.append(Patch(facecolor="none", edgecolor="black", linewidth=1.5, label="zoomed area"))
        if zoom_ax.get_subplotspec() is not None:   # a side panel, not an inset
            whole = right >= next(t.input.right for t in plan.tiles if t.index == chosen)
            zoom_ax.set_title(f"zoom: tile {chosen}" if whole else f"zoom: top-left corner of tile {chosen}")
            zoom_ax.set_xlabel("image x (px)")
    if legend and zoom_ax is not None and zoom_ax.get_subplotspec() is not None:
        figure.legend(handles=handles, loc="outside lower center", ncols=2)
    elif legend:
        ax.legend(handles=handles, loc="upper right", framealpha=0.8)   # inside: the host sized the Axes
    logger.debug("drew %d tiles over a %dx%d image", len(tiles), height, width)
    return figure


def _zoom_window(plan: TilePlan, chosen: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the zoom on ``chosen``, clipped to the image.

    A small tile is shown whole with half a neighbour around it; of a large one the top-left
    corner of its owned region, wide enough to show its halo several times over.
    """
    tile = next(t for t in plan.tiles if t.index == chosen)
    box, region = tile.input, owned_region(tile, plan)
    halo = max(region.top - box.top, region.left - box.left, box.bottom - region.bottom, box.right - region.right)
    side = max(6 * halo, _MIN_ZOOM)
    height, width = plan.image_size
    if max(box.height, box.width) <= 4 * side:
        pad = max(box.height, box.width) // 2
        return (max(0, box.left - pad), max(0, box.top - pad), min(width, box.right + pad),
                min(height, box.bottom + pad))
    return (max(0, region.left - side), max(0, region.top - side), min(width, region.left + side),
            min(height, region.top + side))


def _draw_tiles(ax: Axes, plan: TilePlan, picture: np.ndarray | None, chosen: tuple[int, int] | None,
                step: int, zoomed: bool = False) -> list[Artist]:
    """The image, the overlap shading, every ``step``-th tile outlined and ``chosen`` filled; the key."""
    height, width = plan.image_size
    if picture is not None:
        ax.imshow(picture, extent=(0, width, height, 0), cmap="gray" if picture.ndim == 2 else None,
                  interpolation="nearest" if zoomed else "antialiased", alpha=0.65 if zoomed else None)
    else:
        ax.add_patch(Rectangle((0, 0), width, height, facecolor="0.92", edgecolor="none"))
    ax.set_aspect("equal")
    handles: list[Artist] = []
    row_edges, row_counts = _coverage(plan.row_spans)
    col_edges, col_counts = _coverage(plan.col_spans)
    counts = np.ma.masked_less(np.outer(row_counts, col_counts), 2)
    if counts.count() and step == 1:
        ax.pcolormesh(col_edges, row_edges, counts, cmap="Reds", vmin=1, vmax=max(4.0, counts.max()),
                      alpha=0.5, gid="overlap")
        handles.append(Patch(facecolor="tab:red", alpha=0.5, label="read by ≥ 2 tiles (computed again)"))

    drawn = [t for t in plan.tiles if t.index[0] % step == 0 and t.index[1] % step == 0]
    colors = [_TILE_COLORS[2 * (t.index[0] // step % 2) + t.index[1] // step % 2] for t in drawn]
    ax.add_collection(PolyCollection(_corners([t.input for t in drawn]), facecolors="none", edgecolors=colors,
                                     linewidths=1.0, alpha=0.9, gid="input-boxes"))
    ax.add_collection(PolyCollection(_corners([owned_region(t, plan) for t in drawn]), facecolors="none",
                                     edgecolors="black", linewidths=0.7, linestyles="--", alpha=0.7,
                                     gid="owned-regions"))
    every = "" if step == 1 else f", every {step}th per side drawn"
    handles.insert(0, Patch(facecolor="none", edgecolor="tab:blue", label=f"tile input: what it reads{every}"))
    handles.insert(1, Patch(facecolor="none", edgecolor="black", linestyle="--",
                            label="owned region: what its outputs cover"))
    for tile in plan.tiles if chosen is not None else ():
        if tile.index == chosen:
            box, region = tile.input, owned_region(tile, plan)
            ax.add_patch(Rectangle((box.left, box.top), box.width, box.height, facecolor=_HALO, alpha=0.6,
                                   edgecolor="black", linewidth=1.8, gid="highlight-input"))
            ax.add_patch(Rectangle((region.left, region.top), region.width, region.height, facecolor=_OWNED,
                                   alpha=0.4, edgecolor="black", linewidth=1.0, gid="highlight-owned"))
            halo = (region.top - box.top, region.left - box.left, box.bottom - region.bottom, box.right - region.right)
            handles.append(Patch(facecolor=_HALO, alpha=0.6, edgecolor="black",
                                 label=f"tile {chosen}: halo, read but not owned ({'/'.join(map(str, halo))} px)"))
            handles.append(Patch(facecolor=_OWNED, alpha=0.4, edgecolor="black", label=f"tile {chosen}: owned region"))
    return handles
