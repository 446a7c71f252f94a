"""Memory plots: over training steps (what :class:`~lightstream.widgets.MemoryMonitor` records) and the
estimated step peak against the image size."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightstream.core import StreamingCNN
from lightstream.core.checks import input_channels

from ._axes import GIB, figure_and_axes

__all__ = ["MemorySample", "plot_memory", "plot_memory_by_image_size"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemorySample:
    """Memory and time of one training step.

    Attributes:
        step: the step's index (``trainer.global_step`` after it, or a running count).
        elapsed: seconds since training started, at the end of the step.
        step_time: seconds the step took (forward, backward and optimizer).
        rss: resident memory of the process in bytes (host memory; always recorded).
        allocated: GPU memory held by tensors at the end of the step (``None`` off CUDA).
        peak_allocated: the most GPU memory held by tensors during the step (``None`` off CUDA).
        reserved: GPU memory held by PyTorch's caching allocator (``None`` off CUDA).
        tensor_peak: the most bytes tensors held during the step above what they held before it,
            on any device: the quantity :meth:`~lightstream.StreamingCNN.estimate` predicts as
            ``peak_bytes`` (``None`` when not measured).
    """

    step: int
    elapsed: float
    step_time: float
    rss: int
    allocated: int | None = None
    peak_allocated: int | None = None
    reserved: int | None = None
    tensor_peak: int | None = None


_SERIES = (
    ("tensor_peak", "step's tensor peak (as estimated)", "black", "-"),
    ("peak_allocated", "GPU peak allocated", "tab:red", "-"),
    ("allocated", "GPU allocated (step end)", "tab:orange", "-"),
    ("reserved", "GPU reserved", "tab:purple", "--"),
    ("rss", "process RSS (host)", "tab:blue", "-"),
)


def plot_memory(history: Sequence[MemorySample], axes: tuple[Axes, Axes] | None = None) -> Figure:
    """Memory (GiB, top) and step time (s, bottom) over steps; returns the figure.

    GPU series are drawn when they were recorded (training on CUDA), the step's tensor peak when
    measured; process RSS always (it also counts allocator caching and library pages, so it lies
    above the tensor peak).

    Args:
        history: samples in step order, e.g. ``MemoryMonitor.history``.
        axes: ``(memory_axes, time_axes)`` to draw on instead of a new figure.
    """
    if axes is None:
        figure = Figure(figsize=(8.0, 5.0), layout="constrained")
        memory_ax, time_ax = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    else:
        memory_ax, time_ax = axes
        figure = memory_ax.get_figure(root=True)
    if not history:
        memory_ax.text(0.5, 0.5, "no steps recorded yet", ha="center", va="center",
                       transform=memory_ax.transAxes)
        return figure
    steps = [sample.step for sample in history]
    for name, label, color, style in _SERIES:
        values = [getattr(sample, name) for sample in history]
        if any(v is not None for v in values):
            memory_ax.plot(steps, [float("nan") if v is None else v / GIB for v in values], color=color,
                           linestyle=style, marker="." if len(steps) < 50 else None, label=label)
    memory_ax.set_ylabel("memory (GiB)")
    memory_ax.set_ylim(bottom=0)
    memory_ax.legend(loc="lower right", fontsize="x-small")
    last = history[-1]
    memory_ax.set_title(f"step {last.step}: {last.step_time:.3f} s/step, {last.elapsed:.1f} s elapsed",
                        fontsize="medium")
    time_ax.plot(steps, [sample.step_time for sample in history], color="tab:green",
                 marker="." if len(steps) < 50 else None)
    time_ax.set_ylabel("step time (s)")
    time_ax.set_xlabel("training step")
    time_ax.set_ylim(bottom=0)
    logger.debug("drew memory of %d steps", len(history))
    return figure


def plot_memory_by_image_size(engine: StreamingCNN, sides: Sequence[int], ax: Axes | None = None,
                              dtype: torch.dtype = torch.float32) -> Figure:
    """Estimated peak tensor memory of a training step against the image side; returns the figure.

    With ``stages="auto"`` the engine chooses which stage maps to keep for each image size
    (those that fit ``stage_memory``), so the curve is not monotonic: where fewer maps are kept
    the later stages stream with their own tiles and the peak can drop. Every change of the
    stage plan is marked with a dashed line and labelled with the maps it keeps; the title says why.

    Args:
        engine: the :class:`StreamingCNN` whose current tile size and stage settings are used.
        sides: image sides (px) of square ``(1, C, side, side)`` images to estimate.
        ax: Axes to draw on instead of a new figure.
        dtype: dtype of the activations (as for :meth:`StreamingCNN.estimate`).
    """
    figure, ax = figure_and_axes(ax, (7.0, 4.0))
    sides = sorted(int(side) for side in sides)
    channels = input_channels(engine.stream_module) or 3
    peaks, plans = [], []
    for side in sides:
        shape = (1, channels, side, side)
        peaks.append(engine.estimate(shape, dtype).peak_bytes / GIB)
        plans.append(tuple(p.stage.name for p in engine.stage_plans(shape, dtype)))
    ax.plot(sides, peaks, "o-", color="tab:cyan", label=f"streamed step, tile {engine.tile_size[0]} px (estimate)")
    changes = [k for k in range(1, len(sides)) if plans[k] != plans[k - 1]]
    for k in changes:
        kept = len(plans[k]) - 1
        ax.axvline(sides[k], color="0.4", linestyle="--", linewidth=1, gid="stage-plan-change")
        ax.annotate(f"stage plan changes:\nkeeps {kept} map{'s' if kept != 1 else ''}", (sides[k], 1.0),
                    xycoords=("data", "axes fraction"), xytext=(3, -3), textcoords="offset points",
                    ha="left", va="top", fontsize="small", color="0.3")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image side (px)")
    ax.set_ylabel("estimated peak (GiB)")
    ax.set_ylim(bottom=0)
    if changes:
        ax.plot([], [], color="0.4", linestyle="--", linewidth=1, label="stage plan changes (dashed)")
        ax.set_title("Not monotonic: at each dashed line the engine keeps a different set of stage maps\n"
                     "(those that fit stage_memory), which changes what one tile must hold", fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    logger.debug("drew the estimated memory of %d image sizes, %d stage-plan changes", len(sides), len(changes))
    return figure
