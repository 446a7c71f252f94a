"""Measuring what a streamed step needs: the tensor peak (comparable to the estimate) and process RSS.

:class:`TensorPeak` measures the same quantity :meth:`StreamingCNN.estimate` predicts on every
device: the most bytes held by tensors during a block, above what tensors held when it began.

* On CUDA it is ``torch.cuda.max_memory_allocated`` (reset at the start) minus the bytes allocated
  at the start.
* On the CPU there is no allocator statistic, so the block runs under PyTorch's profiler with
  ``profile_memory=True``: the CPU allocator reports every allocation and free (bytes and time)
  to it, and their running sum is the bytes the block holds; its maximum is the peak. This is the
  allocator's own accounting, so it is exact for tensors (storage freed by the block that was
  allocated before it is not reported, which can only make the peak larger, never smaller). It
  costs a few microseconds per operation (the profiler records each operator), small next to the
  convolutions of an image tile.

Process RSS (:func:`process_rss`, :func:`peak_rss`) is another quantity: it also counts the
allocator's caching, pages of libraries touched for the first time and memory that is freed but
not yet returned to the operating system, so it is usually far larger than the tensor peak.
:func:`release_host_memory` returns glibc's freed heap pages between stages of a streamed step, and
after each tile batch of a stage whose runs hold at least :data:`RUN_TRIM_BYTES`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import torch
from torch.autograd import profiler

__all__ = ["RSS_REASON", "RUN_MMAP_THRESHOLD", "RUN_TRIM_BYTES", "TensorPeak", "peak_rss", "process_rss",
           "release_host_memory", "reset_peak_rss", "tensors_mapped_from"]

RSS_REASON = "process RSS also counts allocator caching and library pages"
"""Why process RSS is larger than the tensor peak, in one line (shown next to RSS figures)."""

RUN_TRIM_BYTES = 512 << 20
"""On the CPU, a stage whose tile batches hold at least this many bytes at their backward's peak
returns the heap's free pages after each batch, not only after the stage: such runs leave about
their own size free in a fragmented heap, which the next run cannot all reuse (8192² ResNet-34
with 1024-px tiles, 0.60 GiB runs: 0.9 GiB free between runs, peak RSS 2.86 -> 2.71 GiB). Below it
the next run reuses what the last one freed, and returning it would only cost page faults
(ResNet-18 at 2048² with 1024-px tiles, runs up to 0.42 GiB: 10 % of the step for 0.24 GiB
of peak RSS)."""


RUN_MMAP_THRESHOLD = 4 << 20
"""While a CPU stage whose runs hold at least :data:`RUN_TRIM_BYTES` runs, tensors of at least this
many bytes are mapped for themselves and returned on free (:func:`tensors_mapped_from`), so the
process holds what its tensors hold: 16384² ResNet-34 with 1024-px tiles, peak RSS 3.73 -> 3.32
GiB over the forward and 150 backward runs, for 20 % more time per run."""

GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest mmap threshold on 64-bit systems, which its dynamic threshold rises to once
large blocks are freed."""

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@contextlib.contextmanager
def tensors_mapped_from(threshold: int) -> Iterator[None]:
    """Within the block, glibc maps every allocation of at least ``threshold`` bytes with ``mmap``
    and unmaps it on ``free``, instead of keeping it in a heap whose free pages the next
    allocations of other sizes cannot reuse. Afterwards the threshold is set to
    :data:`GLIBC_MMAP_THRESHOLD_MAX`, where glibc's dynamic threshold settles once a process has
    freed large tensors. A no-op without glibc's ``mallopt``.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, threshold):
        yield
        return
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)


def release_host_memory() -> None:
    """Return the free pages of the C heap to the operating system (glibc's ``malloc_trim``).

    glibc keeps the pages of freed tensors below its mmap threshold (which rises to 32 MiB once
    large tensors are freed) for reuse; a streamed stage of many tiles leaves a fragmented heap
    that the next stage, with other tile shapes, cannot reuse, so the process holds both. The
    pages come back on first touch, at the cost of a page fault each (the CPU's
    :class:`~lightstream.core.estimate.TimeModel` charges for them). A no-op where the C library
    has no ``malloc_trim`` (macOS, musl).
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def _libc_function(name: str) -> Callable[..., Any] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


class TensorPeak:
    """Context manager: the most bytes held by tensors during the block, above those held at its start.

    Example::

        with TensorPeak(torch.device("cpu")) as peak:
            loss = model(x).sum(); loss.backward()
        peak.bytes  # comparable to StreamingCNN.estimate(...).peak_bytes

    On the CPU the block runs under ``torch.autograd.profiler.profile(profile_memory=True)`` (see
    the module docstring), so it cannot be nested in another profiler: entering then raises
    ``RuntimeError`` naming the conflict.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes = 0
        """The peak, set when the block ends (0 before)."""
        self._base = 0
        self._profiler: profiler.profile | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            if torch.autograd.profiler._is_profiler_enabled:
                raise RuntimeError("TensorPeak measures CPU tensor memory with PyTorch's profiler, and a profiler "
                                   "is already running: stop it first, or measure outside it")
            self._profiler = profiler.profile(profile_memory=True)
            with _native_stderr_silenced():  # libkineto prints start/stop lines to the process's stderr
                self._profiler.__enter__()
        else:
            raise ValueError(f"TensorPeak measures CPU and CUDA tensors, not {self.device.type}")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        assert self._profiler is not None
        with _native_stderr_silenced():
            self._profiler.__exit__(kind, error, traceback)
        self.bytes = _running_peak(self._profiler)
        self._profiler = None


def _running_peak(finished: profiler.profile) -> int:
    """The maximum running sum of the CPU allocations and frees the profiler recorded, in time order."""
    results = finished.kineto_results
    if results is None:
        return 0
    events = sorted((event.start_ns(), event.nbytes()) for event in results.events()
                    if event.name() == "[memory]" and event.device_type() == torch._C._autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to ``/dev/null`` for a moment (native libraries' start-up chatter)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def process_rss() -> int:
    """The process's resident memory now, in bytes."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; whether that worked."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak RSS since start or the last reset, in bytes (Linux ``VmHWM``)."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError("no VmHWM in /proc/self/status")
    return int(match.group(1)) * 1024
