"""A heatmap (feature-map activation or saliency) over a slide thumbnail."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._axes import figure_and_axes

__all__ = ["plot_heatmap_overlay"]


def plot_heatmap_overlay(thumbnail: np.ndarray, heatmap: np.ndarray, ax: Axes | None = None,
                         alpha: float = 0.5, cmap: str = "magma", title: str | None = None) -> Figure:
    """Draw ``heatmap`` (same pixel grid as ``thumbnail``, NaN where there is no value) over it.

    Use :func:`lightstream.data.slide_heatmap` to put a feature or saliency map on the grid.
    """
    if heatmap.shape[:2] != thumbnail.shape[:2]:
        raise ValueError(f"heatmap {heatmap.shape[:2]} and thumbnail {thumbnail.shape[:2]} differ in size")
    figure, ax = figure_and_axes(ax, (6, 6))
    ax.imshow(thumbnail)
    layer = ax.imshow(np.ma.masked_invalid(heatmap), cmap=cmap, alpha=alpha)
    figure.colorbar(layer, ax=ax, fraction=0.046, pad=0.04)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return figure
