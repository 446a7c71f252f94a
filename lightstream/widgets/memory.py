"""A Lightning callback recording memory and step time, with a live plot in notebooks."""

from __future__ import annotations

import io
import logging
import math
import numbers
import time
from typing import Any

import ipywidgets as widgets
import lightning as L
import psutil
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from matplotlib.figure import Figure

from lightstream.core.memory import TensorPeak
from lightstream.viz import MemorySample, plot_memory

from .model import _is_positive_int

__all__ = ["MemoryMonitor", "in_notebook_kernel"]

logger = logging.getLogger(__name__)

_GIB = float(1 << 30)


def in_notebook_kernel() -> bool:
    """Whether code runs in a Jupyter kernel (where widgets can be displayed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class MemoryMonitor(L.Callback):
    """Record memory and step time of every training batch; plot them live in a notebook.

    Each sample holds the step's tensor peak (``tensor_peak``: the most bytes tensors held during
    the step above what they held before it, the quantity
    :meth:`~lightstream.StreamingCNN.estimate` predicts; on the CPU measured with PyTorch's
    profiler, see :class:`~lightstream.core.memory.TensorPeak`) and the process RSS (host
    memory, which also counts allocator caching and library pages); on CUDA also the GPU memory
    held at the end of the step, its absolute peak and the caching allocator's reservation.
    Samples accumulate in
    :attr:`history` (a list of :class:`~lightstream.viz.MemorySample`), reset at each fit.

    Every ``log_every_n_steps`` steps (default: the trainer's) a line is logged through
    :mod:`logging` and the metrics go to the trainer's loggers (``memory/*_gib``,
    ``time/step_s``). In a notebook kernel a plot under the running cell is refreshed at most
    every ``refresh_s`` seconds, and once more when training ends.

    Args:
        live: draw the live plot; default: only in a notebook kernel, on global rank 0.
        refresh_s: minimum seconds between two redraws of the live plot.
        log_every_n_steps: logging period in steps; default the trainer's ``log_every_n_steps``.
        dpi: resolution of the live plot.
        tensor_peak: measure the step's tensor peak; default: on CUDA only (free there). On the CPU
            each step then runs under PyTorch's profiler, which holds every event of the step
            in host memory until it ends: fine for small steps, but gigabytes for a gigapixel
            step of thousands of tiles (7 GiB for a 16384² U-Net step of 400 tiles). It is
            skipped, with one warning, while another profiler runs.
    """

    def __init__(self, live: bool | None = None, refresh_s: float = 1.0, log_every_n_steps: int | None = None,
                 dpi: int = 72, tensor_peak: bool | None = None) -> None:
        super().__init__()
        _check_monitor_arguments(live, refresh_s, log_every_n_steps, dpi)
        if tensor_peak is not None and not isinstance(tensor_peak, bool):
            raise TypeError(f"tensor_peak must be True, False or None (on CUDA only), got {tensor_peak!r}")
        self.tensor_peak = tensor_peak
        self._peak: TensorPeak | None = None
        self.live = live
        self.refresh_s = refresh_s
        self.log_every_n_steps = log_every_n_steps
        self.dpi = dpi
        self.history: list[MemorySample] = []
        self.image: widgets.Image | None = None
        """The live plot's widget while (and after) it is shown."""
        self._process = psutil.Process()
        self._fit_start = 0.0
        self._step_start = 0.0
        self._last_draw = 0.0
        self._figure: Figure | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history = []
        self._fit_start = time.perf_counter()
        live = self.live if self.live is not None else in_notebook_kernel()
        if live and trainer.is_global_zero:
            from IPython.display import display

            self._figure = Figure(figsize=(8.0, 4.5), layout="constrained")
            self.image = widgets.Image(format="png")
            self.image.add_class("lightstream-memory-monitor")
            display(self.image)
        else:
            self._figure, self.image = None, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._peak = None
        wanted = self.tensor_peak if self.tensor_peak is not None else pl_module.device.type == "cuda"
        if wanted and pl_module.device.type in ("cpu", "cuda"):
            try:
                self._peak = TensorPeak(pl_module.device).__enter__()
            except RuntimeError as error:  # another profiler runs (e.g. the Trainer's)
                rank_zero_warn(f"MemoryMonitor: no tensor peak while another profiler runs ({error})")
                self.tensor_peak = False
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        device = pl_module.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        peak, self._peak = self._peak, None
        if peak is not None:
            peak.__exit__(None, None, None)
        sample = MemorySample(
            step=len(self.history), elapsed=now - self._fit_start, step_time=now - self._step_start,
            rss=self._process.memory_info().rss,
            allocated=torch.cuda.memory_allocated(device) if cuda else None,
            peak_allocated=torch.cuda.max_memory_allocated(device) if cuda else None,
            reserved=torch.cuda.memory_reserved(device) if cuda else None,
            tensor_peak=None if peak is None else peak.bytes,
        )
        self.history.append(sample)
        period = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.is_global_zero and sample.step % period == 0:
            self._log(trainer, sample)
        if self._figure is not None and now - self._last_draw >= self.refresh_s:
            self.draw()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._peak is not None:  # a step that raised leaves no profiler running
            self._peak.__exit__(type(exception), exception, exception.__traceback__)
            self._peak = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history and trainer.is_global_zero:
            steps = len(self.history)
            logger.info("memory monitor: %d steps, mean %.3f s/step, max RSS %.2f GiB%s", steps,
                        sum(s.step_time for s in self.history) / steps,
                        max(s.rss for s in self.history) / _GIB, _gpu_peak_text(self.history))
        if self._figure is not None:
            self.draw()

    def draw(self) -> None:
        """Redraw the live plot from :attr:`history` (no-op when no plot is shown)."""
        if self._figure is None or self.image is None:
            return
        self._figure.clear()
        plot_memory(self.history, axes=tuple(self._figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))))
        buffer = io.BytesIO()
        self._figure.savefig(buffer, format="png", dpi=self.dpi)
        self.image.value = buffer.getvalue()
        self._last_draw = time.perf_counter()

    def _log(self, trainer: L.Trainer, sample: MemorySample) -> None:
        metrics = {"time/step_s": sample.step_time, "memory/rss_gib": sample.rss / _GIB}
        for name in ("tensor_peak", "allocated", "peak_allocated", "reserved"):
            value = getattr(sample, name)
            if value is not None:
                metrics[f"memory/{name}_gib"] = value / _GIB
        for trainer_logger in trainer.loggers:
            trainer_logger.log_metrics(metrics, step=trainer.global_step)
        logger.info("step %d: %.3f s/step, tensor peak %s, RSS %.2f GiB%s", sample.step, sample.step_time,
                    "-" if sample.tensor_peak is None else f"{sample.tensor_peak / _GIB:.2f} GiB", sample.rss / _GIB,
                    _gpu_peak_text([sample]))


def _check_monitor_arguments(live: Any, refresh_s: Any, log_every_n_steps: Any, dpi: Any) -> None:
    """Refuse arguments that would silently never plot, never log or fail at the first redraw."""
    if live is not None and not isinstance(live, bool):
        raise TypeError(f"live must be True, False or None (only in a notebook), got {live!r}")
    if isinstance(refresh_s, bool) or not isinstance(refresh_s, numbers.Real) or not 0 <= refresh_s < math.inf:
        raise ValueError(f"refresh_s must be a non-negative number of seconds, got {refresh_s!r}")
    if log_every_n_steps is not None and not _is_positive_int(log_every_n_steps):
        raise ValueError(f"log_every_n_steps must be a positive integer or None, got {log_every_n_steps!r}")
    if not _is_positive_int(dpi):
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")


def _gpu_peak_text(history: list[MemorySample]) -> str:
    peaks = [s.peak_allocated for s in history if s.peak_allocated is not None]
    reserved = [s.reserved for s in history if s.reserved is not None]
    if not peaks:
        return ""
    return f", GPU peak allocated {max(peaks) / _GIB:.2f} GiB, reserved {max(reserved) / _GIB:.2f} GiB"
