"""Exact integer arithmetic of one sliding window (a convolution or pooling) along one axis.

Every per-axis geometry the graph runs (this :class:`Window`, and the resampling geometries of
:mod:`lightstream.core.resample`) offers the same four things: ``stride`` (input positions per
output position, a ``Fraction`` below 1 for upsampling), ``out_len``, ``exact_out`` and
``needed_in`` over half-open intervals, and :meth:`Window.cut`, how a tile holding some rows of
the input runs the operation (a :class:`WindowCut`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

__all__ = ["AxisGeometry", "Window", "WindowCut"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class WindowCut:
    """How a tile runs one window step along one axis (all but ``out`` relative to the tile).

    The operand (holding rows ``[lo, hi)``) is narrowed to ``length`` rows from ``start``,
    padded with ``pad`` rows before them, the op runs, and its outputs from ``first`` on are
    kept: the exact outputs ``out`` of the full map.
    """

    start: int
    length: int
    pad: int
    first: int
    out: tuple[int, int]


class AxisGeometry(Protocol):
    """What the graph's interval arithmetic needs of an operation's geometry along one axis."""

    @property
    def stride(self) -> int | Fraction:
        """Input positions per output position (``Fraction(1, 2)`` for a 2x upsampling)."""

    def out_len(self, n: int) -> int:
        """Output length for an input of length ``n``."""

    def exact_out(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        """Outputs computable exactly from inputs ``[lo, hi)`` of an axis of length ``n``."""

    def needed_in(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        """The input interval that outputs ``[lo, hi)`` read (and that :meth:`cut` narrows to)."""

    def cut(self, lo: int, hi: int, n: int) -> WindowCut:
        """How a tile holding inputs ``[lo, hi)`` runs the operation."""


@dataclass(frozen=True)
class Window:
    """A sliding window along one axis: output ``o`` reads inputs ``o*stride - pad_before + dilation*k``.

    ``k`` runs over ``0 .. kernel-1``. Positions outside ``[0, n)`` are the layer's own padding.
    All methods take and return half-open integer intervals ``[lo, hi)``.
    """

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_before: int = 0
    pad_after: int = 0
    ceil_mode: bool = False
    whole_windows: bool = False
    """The op refuses an input that does not end with a whole window (``pixel_unshuffle``)."""

    @property
    def extent(self) -> int:
        """Number of input positions one output spans: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1

    def out_len(self, n: int) -> int:
        """Output length for an input of length ``n`` (PyTorch's rule, including ``ceil_mode``).

        An empty input gives an empty output, padding or not (PyTorch refuses to run it).
        """
        span = n + self.pad_before + self.pad_after - self.extent
        if n <= 0 or span < 0:
            return 0
        if not self.ceil_mode:
            return span // self.stride + 1
        out = _ceil_div(span, self.stride) + 1
        if (out - 1) * self.stride >= n + self.pad_before:
            out -= 1
        return out

    def exact_out(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        """Outputs computable exactly from inputs ``[lo, hi)`` of an axis of length ``n``.

        An output is exact when everything it reads is inside ``[lo, hi)`` or is padding, which
        is only true of padding at the real borders of the axis (``lo == 0`` or ``hi == n``).
        """
        m = self.out_len(n)
        out_lo = 0 if lo == 0 else _ceil_div(lo + self.pad_before, self.stride)
        out_hi = m if hi == n else min(m, (hi - 1 + self.pad_before - self.extent + 1) // self.stride + 1)
        return out_lo, max(out_lo, out_hi)

    def needed_in(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        """The smallest input interval (clipped to ``[0, n)``) that outputs ``[lo, hi)`` read.

        Outputs that read only padding still need one real border row to be computed.
        """
        first = max(0, lo * self.stride - self.pad_before)
        last = min(n, (hi - 1) * self.stride - self.pad_before + self.extent)
        if last <= first:
            return (0, 1) if last <= 0 else (n - 1, n)
        return first, last


    def cut(self, lo: int, hi: int, n: int) -> WindowCut:
        """The :class:`WindowCut` of this window over an operand holding ``[lo, hi)`` of ``n``."""
        out_lo, out_hi = self.exact_out(lo, hi, n)
        need_lo, need_hi = self.needed_in(out_lo, out_hi, n)
        # The op's output j reads from (t0 - pad_before + j*stride): align t0 to the stride so that
        # j maps onto the global output t0/stride + j.
        t0 = need_lo - need_lo % self.stride
        start = max(t0, lo)
        return WindowCut(start - lo, need_hi - start, start - t0, out_lo - t0 // self.stride, (out_lo, out_hi))
