"""Memory and step time over training steps (what :class:`~lightstream.widgets.MemoryMonitor` records)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._axes import GIB

__all__ = ["MemorySample", "plot_memory"]

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
    """

    step: int
    elapsed: float
    step_time: float
    rss: int
    allocated: int | None = None
    peak_allocated: int | None = None
    reserved: int | None = None


_SERIES = (
    ("peak_allocated", "GPU peak allocated", "tab:red", "-"),
    ("allocated", "GPU allocated (step end)", "tab:orange", "-"),
    ("reserved", "GPU reserved", "tab:purple", "--"),
    ("rss", "process RSS (host)", "tab:blue", "-"),
)


def plot_memory(history: Sequence[MemorySample], axes: tuple[Axes, Axes] | None = None) -> Figure:
    """Memory (GiB, top) and step time (s, bottom) over steps; returns the figure.

    GPU series are drawn when they were recorded (training on CUDA); process RSS always.

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
