"""A label mask (ground truth or prediction) over a slide thumbnail, with a legend of its classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lightstream.data.overlay import blend_labels, label_colors

from ._axes import figure_and_axes, styled

__all__ = ["plot_label_overlay"]


@styled
def plot_label_overlay(thumbnail: np.ndarray, labels: np.ndarray, ax: Axes | None = None, alpha: float = 0.5,
                       class_names: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Draw ``labels`` (class indices on the thumbnail's grid) tinted over ``thumbnail``.

    Use :func:`lightstream.data.labels_on_thumbnail` to put a mask file on the grid. Label 0 is
    background (left untinted); the legend lists the other labels present, by ``class_names[k]``
    where given.
    """
    figure, ax = figure_and_axes(ax, (6, 6))
    ax.imshow(blend_labels(thumbnail, labels, alpha), gid="label-overlay")
    present = [int(k) for k in np.unique(labels) if k != 0]
    handles = [
        Patch(color=label_colors(k) / 255,
              label=class_names[k] if class_names is not None and k < len(class_names) else f"label {k}")
        for k in present
    ]
    if handles:
        ax.legend(handles=handles, loc="upper right")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return figure
