"""Exact integer arithmetic of upsampling operations along one axis: output stride below one.

Decoders (U-Nets, feature pyramids) grow the feature map again. Their operations are local
like a convolution, only the other way round: output ``o`` reads a few inputs near
``o / factor``. Both geometries here offer what :class:`~lightstream.core.window.Window`
offers (``stride``, ``out_len``, ``exact_out``, ``needed_in``, ``cut``), so the graph's
interval arithmetic, the tile plan and the plots take them unchanged; ``stride`` is a
:class:`~fractions.Fraction` (``1/2`` for a 2x upsampling).

A tile runs the operation unchanged on its narrowed input, so the input it narrows to starts
at ``a`` exactly and output ``j`` of that call is output ``a * factor + j`` of the whole map
(for interpolation with ``align_corners=False`` and an integer ``scale_factor`` the source
coordinate ``(o + 0.5) / factor - 0.5`` shifts by whole input pixels; a transposed
convolution's output ``j`` of an input starting at ``a`` is output ``a * stride + j``).
``exact_out`` keeps the outputs whose every read lies inside the tile, or is the map's own
border clamp, which the tile reproduces only at the real border.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from .window import WindowCut

__all__ = ["Resampling", "TransposedWindow", "RESAMPLING_MODES"]

RESAMPLING_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "pixel_shuffle")
"""Modes of :class:`Resampling`: ``F.interpolate``'s (``bilinear`` is ``linear`` along each
axis) and ``pixel_shuffle`` (output ``o`` reads input ``o // factor``, like ``nearest``)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _cut(geometry: Resampling | TransposedWindow, lo: int, hi: int, n: int) -> WindowCut:
    """Narrow to the inputs the exact outputs read; the call's output ``j`` is ``first * factor + j``."""
    out_lo, out_hi = geometry.exact_out(lo, hi, n)
    if out_hi <= out_lo:  # nothing exact: run on what is held, keep nothing
        return WindowCut(0, hi - lo, 0, 0, (out_lo, out_lo))
    first, last = geometry.needed_in(out_lo, out_hi, n)
    return WindowCut(first - lo, last - first, 0, out_lo - first * geometry.factor, (out_lo, out_hi))


@dataclass(frozen=True)
class Resampling:
    """Upsampling by an integer ``factor`` along one axis (interpolation or pixel shuffle)."""

    factor: int
    mode: str = "nearest"

    def __post_init__(self) -> None:
        if self.mode not in RESAMPLING_MODES:
            raise ValueError(f"unknown resampling mode {self.mode!r}; expected one of {RESAMPLING_MODES}")
        if int(self.factor) != self.factor or self.factor < 1:
            raise ValueError(f"the upsampling factor must be a positive integer, got {self.factor!r}")

    @property
    def stride(self) -> Fraction:
        return Fraction(1, self.factor)

    def _reads(self, o: int) -> tuple[int, int]:
        """Inputs output ``o`` reads, ``[first, last]`` before clamping to the axis."""
        f = self.factor
        if self.mode in ("nearest", "pixel_shuffle"):
            return o // f, o // f
        if self.mode == "nearest-exact":
            return (2 * o + 1) // (2 * f), (2 * o + 1) // (2 * f)
        source = (2 * o + 1 - f) // (2 * f)  # floor((o + 0.5) / f - 0.5)
        if self.mode == "bilinear":
            source = max(source, 0)  # PyTorch clamps a negative source coordinate to 0
            return source, source + 1
        return source - 1, source + 2  # bicubic: four taps, each clamped to the axis

    def out_len(self, n: int) -> int:
        return max(n, 0) * self.factor

    def needed_in(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        f = self.factor
        if hi <= lo:
            return (min(lo // f, n - 1), min(lo // f, n - 1) + 1)
        first = min(self._reads(lo)[0], lo // f)  # the tile's call must start at or before lo
        last = max(self._reads(hi - 1)[1] + 1, _ceil_div(hi, f))
        first, last = max(0, first), min(n, last)
        return (first, last) if first < last else (n - 1, n)

    def exact_out(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        f, m = self.factor, self.out_len(n)
        out_lo, out_hi = lo * f, hi * f  # what a call on [lo, hi) produces
        if lo > 0:
            while out_lo < out_hi and self._reads(out_lo)[0] < lo:
                out_lo += 1
        if hi < n:
            while out_hi > out_lo and self._reads(out_hi - 1)[1] > hi - 1:
                out_hi -= 1
        return min(out_lo, m), min(max(out_lo, out_hi), m)

    def cut(self, lo: int, hi: int, n: int) -> WindowCut:
        return _cut(self, lo, hi, n)


@dataclass(frozen=True)
class TransposedWindow:
    """A transposed convolution along one axis.

    Input ``i`` adds to outputs ``i * factor - padding + dilation * k`` for ``k < kernel``
    (``factor`` is the layer's ``stride``); the last ``output_padding`` outputs receive only the bias.
    """

    kernel: int = 1
    factor: int = 1
    dilation: int = 1
    padding: int = 0
    output_padding: int = 0

    @property
    def stride(self) -> Fraction:
        return Fraction(1, self.factor)

    @property
    def _reach(self) -> int:
        return self.dilation * (self.kernel - 1)

    def out_len(self, n: int) -> int:
        if n <= 0:
            return 0
        return max(0, (n - 1) * self.factor - 2 * self.padding + self._reach + self.output_padding + 1)

    def _call_end(self, a: int, b: int) -> int:
        """One past the last output that a call on inputs ``[a, b)`` produces."""
        return a * self.factor + self.out_len(b - a)

    def needed_in(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        s, p = self.factor, self.padding
        if hi <= lo:
            return (min(lo // s, n - 1), min(lo // s, n - 1) + 1)
        first = min(_ceil_div(lo + p - self._reach, s), lo // s)
        last = max((hi - 1 + p) // s + 1,
                   _ceil_div(hi - 1 + 2 * p - self._reach - self.output_padding, s) + 1)
        first, last = max(0, first), min(n, last)
        return (first, last) if first < last else (n - 1, n)

    def exact_out(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        s, p, m = self.factor, self.padding, self.out_len(n)
        out_lo = 0 if lo == 0 else max(lo * s, (lo - 1) * s + 1 - p + self._reach)
        out_hi = m if hi == n else min(self._call_end(lo, hi), hi * s - p)
        return min(out_lo, m), min(max(out_lo, out_hi), m)

    def cut(self, lo: int, hi: int, n: int) -> WindowCut:
        return _cut(self, lo, hi, n)
