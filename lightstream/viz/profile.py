"""Per-layer lost border and receptive field through a trunk (from ``Geometry.profile``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lightstream.core import LayerProfile

from ._axes import NOTEBOOK_WIDTH, styled

__all__ = ["border_increase", "limiting_layer", "plot_receptive_profile"]

logger = logging.getLogger(__name__)

_SIDES = ("top", "left", "bottom", "right")
_MAX_TICK_LABELS = 45
"""More layers than this get every second (third, ...) tick label: 9-pt labels would overlap."""
_MIN_LABELLED_BAND = 9
"""A stride band narrower than 1/9 of the layers gets no label (a 9-pt label would not fit)."""
_BAND = "0.91"
_FIELD = "tab:green"
_LIMIT = "tab:red"


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


@styled
def plot_receptive_profile(
    profile: Sequence[LayerProfile] | Sequence[Sequence[LayerProfile]],
    ax: Axes | tuple[Axes, Axes] | None = None,
    *,
    cuts: Sequence[str] = (),
    tile_size: int | tuple[int, int] | None = None,
    mark_limiting: bool = True,
    legend: bool = True,
) -> Figure:
    """Plot the lost border per side and the receptive field of every layer; returns the figure.

    The streamed backward recomputes each tile's forward region, so the backward loses exactly
    the forward's border: one curve per side serves both. On a new figure each quantity gets its
    own panel (lost border above, receptive field below, layers along a shared x axis); grey and
    white bands group the layers of one output stride, a red line marks the layer that limits the
    tile stride, and a key below names every mark. When no layer loses anything the upper panel
    says so in a sentence instead of drawing an empty axis.

    Args:
        profile: ``Geometry.profile(tile_size)``, or a list of such profiles (one per stage of
            a staged trunk, in image px: see :func:`lightstream.widgets.stage_profiles`): stages
            are drawn one after another with a cut marker between them.
        ax: draw on this Axes (the receptive field then goes on a twin axis at the right, coloured
            and keyed as such), or on two Axes ``(lost_border_ax, receptive_field_ax)``.
        cuts: layer paths after which to draw a stage cut marker (in addition to the stage
            boundaries of a list of profiles).
        tile_size: the tile the profile was computed for; the title states its valid interior
            (unstaged) and the no-loss sentence names it.
        mark_limiting: mark the layer found by :func:`limiting_layer` (in each stage: a stage
            is tiled on its own, so each has its own tile stride).
        legend: draw the key (below a new figure, inside a given ``ax``); a host that keys the
            marks itself (a compact widget) can leave it out.
    """
    stages = _as_stages(profile)
    layers = [layer for stage in stages for layer in stage]
    figure, lost_ax, field_ax = _profile_axes(ax)
    if not layers:
        lost_ax.text(0.5, 0.5, "no layers to draw", ha="center", va="center", transform=lost_ax.transAxes)
        return figure
    twin = field_ax is None
    if field_ax is None:
        field_ax = lost_ax.twinx()
    panels = [lost_ax] if twin else [lost_ax, field_ax]
    x = np.arange(len(layers))
    lost = np.array([layer.lost for layer in layers])

    for panel in panels:
        _draw_stride_bands(panel, layers, labelled=panel is lost_ax)
    handles: list[Artist] = [Patch(facecolor=_BAND, edgecolor="0.6", label="grey / white band: layers at one stride")]
    if lost.any():
        handles += _draw_lost(lost_ax, x, lost)
    else:
        lost_ax.set_yticks([])
        lost_ax.text(0.5, 0.45, _nothing_lost(tile_size), ha="center", va="center", transform=lost_ax.transAxes,
                     gid="nothing-lost", bbox={"facecolor": "white", "edgecolor": "0.6", "boxstyle": "round,pad=0.6"})
    lost_ax.set_ylabel("lost border per side\n(image px)")
    handles += _draw_fields(field_ax, x, np.array([layer.receptive_field for layer in layers]), twin)

    boundaries = np.cumsum([len(stage) for stage in stages])[:-1] - 0.5
    positions = [*boundaries, *(i + 0.5 for i, layer in enumerate(layers) if layer.path in cuts)]
    for position in positions:
        for panel in panels:
            panel.axvline(position, color="black", linestyle="-.", linewidth=1.3,
                          gid="stage-cut" if panel is lost_ax else None)
    if positions:
        handles.append(Line2D([], [], color="black", linestyle="-.", label="stage cut"))

    limiting: dict[int, int] = {}   # layer index -> px of border it adds
    offset = 0
    for stage in stages if mark_limiting and lost.any() else []:
        if stage:
            index = offset + limiting_layer(stage)
            limiting[index] = border_increase(stage)[index - offset]
            for panel in panels:
                panel.axvline(index, color=_LIMIT, linewidth=2.5, alpha=0.6,
                              gid="limiting-layer" if panel is lost_ax else None)
        offset += len(stage)
    if limiting:
        what = "limits the tile stride" if len(stages) == 1 else "limits its stage's tile stride"
        handles.append(Line2D([], [], color=_LIMIT, linewidth=2.5, alpha=0.6,
                              label=f"{what}\n(red label: the border it adds)"))

    step = max(1, -(-len(layers) // _MAX_TICK_LABELS))
    shown = sorted({*x[::step], *limiting})
    bottom = panels[-1]
    bottom.set_xticks(shown, [f"{layers[i].path} +{limiting[i]} px" if i in limiting else layers[i].path
                              for i in shown], rotation=90)
    for label, index in zip(bottom.get_xticklabels(), shown):
        if index in limiting:
            label.set_color(_LIMIT)
            label.set_fontweight("bold")
    bottom.set_xlim(-0.5, len(layers) - 0.5)
    if not twin:
        lost_ax.tick_params(axis="x", labelbottom=False)
    if ax is None:
        if legend:
            figure.legend(handles=handles, loc="outside lower center", ncols=2)
        figure.suptitle(_title(stages, tile_size))
    else:
        if legend:   # inside: the host sized the Axes (the curves rise to the right, the key sits left)
            # on a twin, the key goes on the twin: it is drawn above the lost-border Axes
            (field_ax if twin else lost_ax).legend(handles=handles, loc="upper left", framealpha=0.8)
        lost_ax.set_title(_title(stages, tile_size).replace("; ", "\n"), pad=18)   # an Axes is narrower
    logger.debug("drew the profile of %d layers in %d stage(s)", len(layers), len(stages))
    return figure


def _profile_axes(ax: Axes | tuple[Axes, Axes] | None) -> tuple[Figure, Axes, Axes | None]:
    """The figure, the lost-border Axes and the receptive-field Axes (``None``: use a twin)."""
    if ax is None:
        figure = Figure(figsize=(NOTEBOOK_WIDTH, 6.6), layout="constrained")
        lost_ax, field_ax = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        return figure, lost_ax, field_ax
    if isinstance(ax, Axes):
        return ax.get_figure(root=True), ax, None
    lost_ax, field_ax = ax
    return lost_ax.get_figure(root=True), lost_ax, field_ax


def _draw_lost(ax: Axes, x: np.ndarray, lost: np.ndarray) -> list[Artist]:
    """Step curves of the lost border per side; sides that coincide share one curve."""
    colors = {"top": "tab:blue", "left": "tab:cyan", "bottom": "tab:orange", "right": "tab:brown"}
    lines: list[Artist] = []
    # top/left thick under bottom/right thin: both stay visible where the sides coincide
    for side, across, width in (("top", "left", 3.0), ("bottom", "right", 1.5)):
        column, other = lost[:, _SIDES.index(side)], lost[:, _SIDES.index(across)]
        same = np.array_equal(column, other)
        lines += ax.step(x, column, where="mid", color=colors[side], linewidth=width,
                         label=f"lost {side} = {across}" if same else f"lost {side}")
        if not same:
            lines += ax.step(x, other, where="mid", color=colors[across], linewidth=width, linestyle="--",
                             label=f"lost {across}")
    ax.set_ylim(0, lost.max() * 1.08)
    return lines


def _draw_fields(ax: Axes, x: np.ndarray, fields: np.ndarray, twin: bool) -> list[Artist]:
    """The receptive field per layer; on a twin axis its axis and label take the curve's colour."""
    label = "receptive field (right axis)" if twin else "receptive field"
    same = np.array_equal(fields[:, 0], fields[:, 1])
    lines = ax.plot(x, fields[:, 0], color=_FIELD, marker="o", markersize=3.5, linewidth=1.6,
                    label=label if same else f"{label}, height")
    if not same:
        lines += ax.plot(x, fields[:, 1], color=_FIELD, linestyle="--", linewidth=1.6, label=f"{label}, width")
    ax.set_ylim(0, fields.max() * 1.08)
    ax.set_ylabel("receptive field\n(image px)", color=_FIELD if twin else "black")
    if twin:
        ax.spines["right"].set_visible(True)
        ax.tick_params(axis="y", colors=_FIELD)
    return lines


def _nothing_lost(tile_size: int | tuple[int, int] | None) -> str:
    if tile_size is None:
        at = ""
    else:
        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        at = f" at {th}-px tiles" if th == tw else f" at {th}×{tw}-px tiles"
    return (f"no border (and no gradient) is lost{at}:\nevery tile holds its outputs' receptive fields,\n"
            "so neighbouring tiles need not overlap")


def _as_stages(profile: Sequence[LayerProfile] | Sequence[Sequence[LayerProfile]]
               ) -> list[list[LayerProfile]]:
    if profile and not isinstance(profile[0], LayerProfile):
        return [list(stage) for stage in profile]  # type: ignore[arg-type]
    return [list(profile)]  # type: ignore[arg-type]


def _draw_stride_bands(ax: Axes, layers: list[LayerProfile], labelled: bool) -> None:
    """Alternating grey/white bands over runs of layers with the same cumulative stride, labelled when wide."""
    start, band = 0, 0
    for index in range(1, len(layers) + 1):
        if index == len(layers) or layers[index].stride != layers[start].stride:
            ax.axvspan(start - 0.5, index - 0.5, color=_BAND if band % 2 == 0 else "white", zorder=0, linewidth=0)
            sy, sx = layers[start].stride
            if labelled and (index - start) * _MIN_LABELLED_BAND >= len(layers):
                ax.text((start + index - 1) / 2, 1.01, f"stride {sy}" if sy == sx else f"stride {sy}×{sx}",
                        transform=ax.get_xaxis_transform(), ha="center", va="bottom", color="0.3")
            start, band = index, band + 1


def _title(stages: list[list[LayerProfile]], tile_size: int | tuple[int, int] | None) -> str:
    ends = [stage[-1].lost for stage in stages if stage]
    if len(ends) > 1:
        borders = ", ".join(f"{top}/{bottom}" for top, _, bottom, _ in ends)
        return (f"{len(ends)} stages, each streamed on its own; lost border at each stage's end: {borders} px "
                "(top/bottom)\nforward = backward: the backward recomputes each tile's forward region")
    top, left, bottom, right = ends[0]
    title = f"lost border: {top}/{bottom} px (top/bottom), {left}/{right} px (left/right)"
    if tile_size is not None:
        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        title += f"; valid interior of a {th}×{tw} tile: {th - top - bottom}×{tw - left - right} px"
    return title + "\nforward = backward: the backward recomputes each tile's forward region"
