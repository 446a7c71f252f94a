"""Figure/axes plumbing shared by the plots: draw on a given Axes, or on a new pyplot-free Figure."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

GIB = float(1 << 30)


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
