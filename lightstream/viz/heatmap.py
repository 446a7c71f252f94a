"""A heatmap (feature-map activation or saliency) over a slide thumbnail, with its colour scale."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._axes import figure_and_axes, styled

__all__ = ["plot_heatmap_overlay"]


@styled
def plot_heatmap_overlay(thumbnail: np.ndarray, heatmap: np.ndarray, ax: Axes | None = None,
                         alpha: float = 0.5, cmap: str = "magma", title: str | None = None, *,
                         label: str | None = None, percentile: float | None = None) -> Figure:
    """Draw ``heatmap`` (same pixel grid as ``thumbnail``, NaN where there is no value) over it.

    A colour bar beside the axes gives the scale. Use :func:`lightstream.data.slide_heatmap` to
    put a feature or saliency map on the grid.

    Args:
        label: the colour bar's label (what the values are).
        percentile: clip the colour scale at this percentile of the finite values (e.g. 99), so a
            few extreme values do not leave the rest of the map in the darkest colour; the colour
            bar then shows an arrow for the clipped values.
    """
    if heatmap.shape[:2] != thumbnail.shape[:2]:
        raise ValueError(f"heatmap {heatmap.shape[:2]} and thumbnail {thumbnail.shape[:2]} differ in size")
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    figure, ax = figure_and_axes(ax, (6, 6))
    ax.imshow(thumbnail)
    finite = heatmap[np.isfinite(heatmap)]
    vmax = float(np.percentile(finite, percentile)) if percentile is not None and finite.size else None
    layer = ax.imshow(np.ma.masked_invalid(heatmap), cmap=cmap, alpha=alpha, vmax=vmax, gid="heatmap")
    clipped = vmax is not None and float(finite.max()) > vmax
    figure.colorbar(layer, ax=ax, fraction=0.046, pad=0.04, label=label, extend="max" if clipped else "neither")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return figure
