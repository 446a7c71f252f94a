"""Figure/axes plumbing shared by the plots: one style, and a given Axes or a new pyplot-free Figure.

Figures are sized for a notebook cell (about 9 in = 900 px wide at 100 dpi), so the fonts of
:data:`STYLE` (at least 9 pt) stay legible without zooming.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

GIB = float(1 << 30)
NOTEBOOK_WIDTH = 9.0
"""Width (in) of a figure that fills a notebook cell at 100 % zoom; wider figures get shrunk."""
FONT_SIZE = 9.5
STYLE = {
    "font.size": FONT_SIZE,
    "axes.titlesize": 10.5,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
    "figure.titlesize": 11,
    "figure.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
"""The rc settings every plot of :mod:`lightstream.viz` is drawn under."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


def styled(plot: Callable[_P, _R]) -> Callable[_P, _R]:
    """Draw ``plot`` under :data:`STYLE` (fonts, spines), whatever the caller's rc settings."""

    @functools.wraps(plot)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new ``Figure`` (not registered with pyplot) with one Axes."""
    if ax is not None:
        return ax.get_figure(root=True), ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def format_bytes(count: float) -> str:
    """``3440811264`` -> ``'3.20 GiB'`` (binary units)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
