"""Per-layer lost border and receptive field through a trunk (from ``Geometry.profile``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightstream.core import LayerProfile

from ._axes import figure_and_axes

__all__ = ["plot_receptive_profile", "limiting_layer", "border_increase"]

logger = logging.getLogger(__name__)

_SIDES = ("top", "left", "bottom", "right")
_MAX_TICK_LABELS = 60
_MIN_LABELLED_BAND = 25
"""A stride band narrower than 1/25 of the layers gets no label (they would overlap)."""


def border_increase(profile: Sequence[LayerProfile]) -> list[int]:
    """Per layer: how much it grows the lost border of the trunk so far (image px, both sides).

    The growth is taken over the running maximum of the earlier layers' borders (per axis,
    summed over both sides), so a parallel branch that loses less (a ResNet downsample path)
    counts as no growth, and the layer after it is not credited with the main path's border.
    """
    increases = []
    seen = [0, 0]
    for layer in profile:
        top, left, bottom, right = layer.lost
        totals = (top + bottom, left + right)
        increases.append(max(0, *(totals[a] - seen[a] for a in range(2))))
        seen = [max(seen[a], totals[a]) for a in range(2)]
    return increases


def limiting_layer(profile: Sequence[LayerProfile]) -> int:
    """Index of the layer that limits the tile stride: the largest growth of the lost border.

    Every layer's border adds up to the final lost border, which (with the tile size) sets the
    stride between tiles; the layer adding the most is the one to change (a smaller kernel,
    less dilation, or a stage cut before it) to let tiles advance further. Ties go to the
    deepest layer, where a pixel of border is the most expensive (coarsest stride).
    """
    if not profile:
        raise ValueError("empty profile: the trunk has no convolution or pooling layer")
    increases = border_increase(profile)
    best = max(increases)
    return max(i for i, v in enumerate(increases) if v == best)


def plot_receptive_profile(
    profile: Sequence[LayerProfile] | Sequence[Sequence[LayerProfile]],
    ax: Axes | None = None,
    *,
    cuts: Sequence[str] = (),
    tile_size: int | tuple[int, int] | None = None,
    mark_limiting: bool = True,
) -> Figure:
    """Plot the lost border per side and the receptive field of every layer; returns the figure.

    The streamed backward recomputes each tile's forward region, so the backward loses exactly
    the forward's border: one curve per side serves both.

    Args:
        profile: ``Geometry.profile(tile_size)``, or a list of such profiles (one per stage of
            a staged trunk, in image px: see :func:`lightstream.widgets.stage_profiles`): stages
            are drawn one after another with a cut marker between them.
        ax: draw on this Axes instead of a new figure.
        cuts: layer paths after which to draw a stage cut marker (in addition to the stage
            boundaries of a list of profiles).
        tile_size: when given (and unstaged), the title states the valid interior of such a tile.
        mark_limiting: mark the layer found by :func:`limiting_layer` (in each stage: a stage
            is tiled on its own, so each has its own tile stride).
    """
    stages = _as_stages(profile)
    layers = [layer for stage in stages for layer in stage]
    figure, ax = figure_and_axes(ax, (9.0, 4.5))
    if not layers:
        ax.text(0.5, 0.5, "no layers to draw", ha="center", va="center", transform=ax.transAxes)
        return figure
    x = np.arange(len(layers))
    lost = np.array([layer.lost for layer in layers])

    _draw_stride_bands(ax, layers)
    colors = {"top": "tab:blue", "left": "tab:cyan", "bottom": "tab:red", "right": "tab:orange"}
    # top/left thick under bottom/right thin: both stay visible where the sides coincide
    for side, across, width in (("top", "left", 2.6), ("bottom", "right", 1.3)):
        column, other = lost[:, _SIDES.index(side)], lost[:, _SIDES.index(across)]
        same = np.array_equal(column, other)
        ax.step(x, column, where="mid", color=colors[side], linewidth=width,
                label=f"lost {side} = {across}" if same else f"lost {side}")
        if not same:
            ax.step(x, other, where="mid", color=colors[across], linewidth=width, linestyle="--",
                    label=f"lost {across}")
    ax.set_ylabel("lost border per side (image px)")
    ax.set_ylim(bottom=0)

    field_ax = ax.twinx()
    fields = np.array([layer.receptive_field for layer in layers])
    field_ax.plot(x, fields[:, 0], color="0.45", linestyle=":", marker=".", markersize=3,
                  label="receptive field (height)")
    if not np.array_equal(fields[:, 0], fields[:, 1]):
        field_ax.plot(x, fields[:, 1], color="0.2", linestyle=":", label="receptive field (width)")
    field_ax.set_ylabel("receptive field (image px)", color="0.35")
    field_ax.set_ylim(bottom=0)

    boundaries = np.cumsum([len(stage) for stage in stages])[:-1] - 0.5
    positions = [*boundaries, *(i + 0.5 for i, layer in enumerate(layers) if layer.path in cuts)]
    for position in positions:
        ax.axvline(position, color="black", linestyle="-.", linewidth=1.2, gid="stage-cut")
    if positions:
        ax.plot([], [], color="black", linestyle="-.", label="stage cut")

    offset = 0
    for stage in stages if mark_limiting else []:
        if stage:
            index = offset + limiting_layer(stage)
            growth = border_increase(stage)[index - offset]
            ax.axvline(index, color="tab:red", linewidth=2.0, alpha=0.5, gid="limiting-layer")
            ax.annotate(f"limits tile stride:\n{layers[index].path} (+{growth} px)", xy=(index, 0.55),
                        xycoords=ax.get_xaxis_transform(), xytext=(-6, 0), textcoords="offset points",
                        ha="right", va="center", fontsize="x-small", color="tab:red",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        offset += len(stage)

    step = max(1, -(-len(layers) // _MAX_TICK_LABELS))
    ax.set_xticks(x[::step], [layer.path for layer in layers][::step], rotation=90,
                  fontsize="x-small" if len(layers) <= _MAX_TICK_LABELS // 2 else "xx-small")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = field_ax.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="upper left", fontsize="x-small",
              framealpha=0.85)
    ax.set_title(_title(stages, tile_size), fontsize="medium", pad=12)
    logger.debug("drew the profile of %d layers in %d stage(s)", len(layers), len(stages))
    return figure


def _as_stages(profile: Sequence[LayerProfile] | Sequence[Sequence[LayerProfile]]
               ) -> list[list[LayerProfile]]:
    if profile and not isinstance(profile[0], LayerProfile):
        return [list(stage) for stage in profile]  # type: ignore[arg-type]
    return [list(profile)]  # type: ignore[arg-type]


def _draw_stride_bands(ax: Axes, layers: list[LayerProfile]) -> None:
    """Alternating light bands over runs of layers with the same cumulative stride, labelled when wide."""
    start, band = 0, 0
    for index in range(1, len(layers) + 1):
        if index == len(layers) or layers[index].stride != layers[start].stride:
            ax.axvspan(start - 0.5, index - 0.5, color="0.93" if band % 2 == 0 else "white", zorder=0,
                       linewidth=0)
            sy, sx = layers[start].stride
            if (index - start) * _MIN_LABELLED_BAND >= len(layers):
                ax.text((start + index - 1) / 2, 1.0, f"stride {sy}" if sy == sx else f"stride {sy}×{sx}",
                        transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize="xx-small",
                        color="0.35")
            start, band = index, band + 1


def _title(stages: list[list[LayerProfile]], tile_size: int | tuple[int, int] | None) -> str:
    ends = [stage[-1].lost for stage in stages if stage]
    if len(ends) > 1:
        borders = ", ".join(f"{top}/{bottom}" for top, _, bottom, _ in ends)
        return (f"{len(ends)} stages, each streamed on its own; lost border at each stage's end: "
                f"{borders} px (top/bottom)\nforward = backward (the backward recomputes each tile's "
                "forward region)")
    top, left, bottom, right = ends[0]
    title = f"lost border: {top}/{bottom} px (top/bottom), {left}/{right} px (left/right)"
    if tile_size is not None:
        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        title += f"; valid interior of a {th}×{tw} tile: {th - top - bottom}×{tw - left - right} px"
    return title + "\nforward = backward (the backward recomputes each tile's forward region)"
