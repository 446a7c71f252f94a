"""Tile geometry: receptive fields, output stride, lost borders and the tile plan of an image.

Everything here is exact integer arithmetic over the traced trunk (no network is run), so a
new tile size is planned in milliseconds and a slider can drive it. The same :class:`TilePlan`
is what the engine executes, what the plots draw and what the memory estimate reads.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from .errors import ImageSizeError, TileTooSmallError
from .graph import Span, TrunkGraph

__all__ = ["Box", "Tile", "TilePlan", "LayerProfile", "Geometry", "Stride", "as_pair"]

_LONG_AXIS = 1 << 20  # an axis long enough that its middle is far from both borders

Stride = int | Fraction
"""Image pixels per feature-map pixel: an ``int``, or a ``Fraction`` below 1 after upsampling."""


def _simplest(stride: Stride) -> Stride:
    """A whole stride as an ``int`` (``Fraction(4, 2)`` -> ``2``), else the fraction itself."""
    return int(stride) if Fraction(stride).denominator == 1 else Fraction(stride)


def as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``512`` -> ``(512, 512)``; ``(h, w)`` stays; ``(1, 3, h, w)`` (a tile shape) -> ``(h, w)``."""
    if isinstance(size, int):
        return (size, size)
    values = tuple(int(v) for v in size)
    if len(values) not in (2, 4):
        raise ValueError(f"expected a size, (height, width) or (B, C, height, width), got {size!r}")
    return values[-2], values[-1]


@dataclass(frozen=True)
class Box:
    """Half-open rectangle ``rows [top, bottom) x cols [left, right)`` in one map's pixels."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def rows(self) -> slice:
        return slice(self.top, self.bottom)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.right)

    @property
    def area(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Tile:
    """One tile: the image pixels it reads and the feature-map pixels it owns.

    The ``output`` boxes of a plan's tiles partition the feature map, so every output pixel
    (and through it every gradient contribution) is produced by exactly one tile.
    """

    index: tuple[int, int]
    input: Box
    output: Box


@dataclass(frozen=True)
class TilePlan:
    """How an image of ``image_size`` is streamed with tiles of at most ``tile_size`` pixels."""

    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    output_size: tuple[int, int]
    output_stride: tuple[Stride, Stride]
    row_spans: tuple[tuple[Span, Span], ...]
    col_spans: tuple[tuple[Span, Span], ...]
    layer_sizes: list[tuple[int, int]] = field(repr=False, compare=False)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tiles along height and width."""
        return len(self.row_spans), len(self.col_spans)

    @property
    def tiles(self) -> list[Tile]:
        """All tiles in row-major order."""
        return [
            Tile((i, j), Box(r_in[0], c_in[0], r_in[1], c_in[1]), Box(r_out[0], c_out[0], r_out[1], c_out[1]))
            for (i, (r_in, r_out)), (j, (c_in, c_out))
            in itertools.product(enumerate(self.row_spans), enumerate(self.col_spans))
        ]

    def __len__(self) -> int:
        return len(self.row_spans) * len(self.col_spans)

    @property
    def recompute_factor(self) -> float:
        """Pixels read by all tiles over pixels of the image (1.0 means no overlap)."""
        rows = sum(b - a for (a, b), _ in self.row_spans)
        cols = sum(b - a for (a, b), _ in self.col_spans)
        return rows * cols / (self.image_size[0] * self.image_size[1])

    @property
    def tile_stride(self) -> tuple[Stride, Stride]:
        """Image pixels between the starts of neighbouring interior tiles."""
        def step(spans: tuple[tuple[Span, Span], ...], stride: Stride) -> Stride:
            _, (lo, hi) = spans[1] if len(spans) > 2 else spans[0]  # spans[0] is a larger border tile
            return _simplest((hi - lo) * stride)
        return step(self.row_spans, self.output_stride[0]), step(self.col_spans, self.output_stride[1])


@dataclass(frozen=True)
class LayerProfile:
    """Geometry of one convolution or pooling layer, for an interior tile.

    ``lost`` is ``(top, left, bottom, right)``: image pixels at each side of the tile whose
    values at this layer's output cannot be computed from the tile alone. The streamed
    backward recomputes exactly the forward's valid region, so the backward loses the same.
    """

    path: str
    stride: tuple[Stride, Stride]
    receptive_field: tuple[int, int]
    lost: tuple[int, int, int, int]


class Geometry:
    """Exact receptive-field arithmetic of a traced trunk.

    Args:
        graph: the trunk traced by :class:`~lightstream.core.graph.TrunkGraph`.
    """

    def __init__(self, graph: TrunkGraph) -> None:
        self.graph = graph
        self._spatial = [i for i, s in enumerate(graph.steps) if s.spatial]
        sizes = graph.sizes(_LONG_AXIS, _LONG_AXIS)
        self.strides: list[tuple[Stride, Stride]] = self._cumulative_strides()
        """Cumulative stride (image px per step px) of every step; a ``Fraction`` where a step is
        finer than the image (after upsampling), an ``int`` elsewhere."""
        self.output_stride: tuple[Stride, Stride] = self.strides[graph.output]
        self.receptive_field: tuple[int, int] = (self._widest_field(0, sizes), self._widest_field(1, sizes))
        """Image pixels that one interior output pixel depends on, per axis (the most over the
        output pixels' positions relative to the coarsest stride: in a U-Net they differ)."""

    def _widest_field(self, axis: int, sizes: list[tuple[int, int]]) -> int:
        """The widest input span one interior output pixel needs along ``axis``.

        Output pixels repeat their dependence pattern with the period of the strides inside the
        trunk: a classification trunk's output pixels all need the same span, while a U-Net's
        at full resolution alternate with the position modulo its coarsest stride.
        """
        period = math.lcm(*(int(part) for pair in self.strides for stride in pair
                            for part in Fraction(stride).as_integer_ratio()))
        middle = sizes[self.graph.output][axis] // 2
        spans = (self.graph.needed_span((o, o + 1), axis, sizes) for o in range(middle, middle + period))
        return max(hi - lo for lo, hi in spans)

    def _cumulative_strides(self) -> list[tuple[Stride, Stride]]:
        strides: list[tuple[Stride, Stride]] = []
        for step in self.graph.steps:
            if not step.spatial or not step.inputs:
                strides.append((1, 1))
            elif step.window is not None:
                sy, sx = strides[step.inputs[0]]
                strides.append((_simplest(sy * step.window[0].stride), _simplest(sx * step.window[1].stride)))
            else:
                strides.append(strides[step.inputs[0]])
        return strides

    @property
    def fingerprint(self) -> str:
        """A hash of everything the geometry depends on (layer types, windows, wiring)."""
        digest = hashlib.sha256()
        for step in self.graph.steps:
            if step.spatial:
                digest.update(repr((step.path, step.window, step.dims, step.inputs)).encode())
        return digest.hexdigest()[:16]

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Feature-map size ``(h, w)`` for an image of ``(H, W)`` pixels."""
        return self.graph.sizes(*image_size)[self.graph.output]

    def min_tile_size(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The smallest tile that can produce one output pixel (the receptive field, clipped)."""
        if image_size is None:
            return self.receptive_field
        return min(self.receptive_field[0], image_size[0]), min(self.receptive_field[1], image_size[1])

    def plan(self, image_size: tuple[int, int], tile_size: int | tuple[int, int]) -> TilePlan:
        """Split an image into tiles of at most ``tile_size`` pixels whose outputs partition the map.

        Raises:
            TileTooSmallError: when a tile cannot hold the receptive field of one output pixel.
            ValueError: when the image is too small for the trunk to produce any output.
        """
        image_size = as_pair(image_size)
        tile = as_pair(tile_size)
        sizes = self.graph.sizes(*image_size)
        self._check_merges(image_size, sizes)
        out = sizes[self.graph.output]
        if out[0] <= 0 or out[1] <= 0:
            raise ValueError(f"an image of {image_size[0]}x{image_size[1]} px is too small for this "
                             "trunk: its feature map would be empty")
        spans = []
        for axis in range(2):
            axis_spans = self._axis_plan(axis, out[axis], tile[axis], sizes)
            if axis_spans is None:
                raise TileTooSmallError(tile, self.min_tile_size(image_size))
            spans.append(axis_spans)
        return TilePlan(image_size, tile, out, self.output_stride, spans[0], spans[1], sizes)

    def _check_merges(self, image_size: tuple[int, int], sizes: list[tuple[int, int]]) -> None:
        """Refuse an image size on which a merge meets maps of different sizes (see :class:`ImageSizeError`)."""
        step = self.graph.unequal_merge(sizes)
        if step is None:
            return
        suggestion = list(image_size)
        for axis in range(2):  # the sizes along one axis depend on that axis alone
            limit = 2 * image_size[axis]
            while suggestion[axis] < limit and self.graph.unequal_merge(self.graph.sizes(*suggestion), axis):
                suggestion[axis] += 1
        operands = [(self.graph.steps[i].path, sizes[i]) for i in step.inputs]
        raise ImageSizeError(step.path, image_size, operands, (suggestion[0], suggestion[1]))

    def tiles_along(self, image_size: tuple[int, int], axis: int, tile: int) -> tuple[int, int] | None:
        """How many tiles of ``tile`` pixels along ``axis`` cover ``image_size``, and the pixels they
        read together along it (overlaps counted per tile); ``None`` when the tile is too short."""
        sizes = self.graph.sizes(*image_size)
        spans = self._axis_plan(axis, sizes[self.graph.output][axis], tile, sizes)
        return None if spans is None else (len(spans), sum(b - a for (a, b), _ in spans))

    def tile_length(self, image_size: tuple[int, int], axis: int, tiles: int) -> int:
        """The shortest tile along ``axis`` with which ``tiles`` tiles cover ``image_size`` (the
        longest input span of ``tiles`` even cells of the output; fewer may then do)."""
        sizes = self.graph.sizes(*image_size)
        length = sizes[self.graph.output][axis]
        bounds = [length * i // tiles for i in range(tiles + 1)]
        spans = (self.graph.needed_span(cell, axis, sizes) for cell in itertools.pairwise(bounds) if cell[1] > cell[0])
        return max(b - a for a, b in spans)

    def _axis_plan(self, axis: int, length: int, tile: int, sizes: list[tuple[int, int]]
                   ) -> tuple[tuple[Span, Span], ...] | None:
        """Cells along one axis: the fewest that fit the tile, as equal in size as they fit."""
        need = self.graph.needed_span

        def fits(lo: int, hi: int) -> bool:
            a, b = need((lo, hi), axis, sizes)
            return b - a <= tile

        cells: list[Span] = []
        lo, size = 0, 1
        while lo < length:
            if not fits(lo, lo + 1):
                return None
            hi = min(length, lo + size)
            if fits(lo, hi) and (hi == length or not fits(lo, hi + 1)):
                pass  # same cell size as the previous one: the common, interior case
            else:
                good, bad = lo + 1, length + 1  # fits(good) holds; bad is past the end
                while bad - good > 1:
                    mid = (good + bad) // 2
                    good, bad = (mid, bad) if fits(lo, mid) else (good, mid)
                hi = good
            cells.append((lo, hi))
            size, lo = hi - lo, hi
        return tuple((need(cell, axis, sizes), cell) for cell in _balanced(cells, fits))

    def profile(self, tile_size: int | tuple[int, int]) -> list[LayerProfile]:
        """Per convolution/pooling layer: stride, receptive field and lost border of an interior tile."""
        tile = as_pair(tile_size)
        sizes = self.graph.sizes(_LONG_AXIS, _LONG_AXIS)
        starts = [(_LONG_AXIS // 2) - (_LONG_AXIS // 2) % self.output_stride[a] for a in range(2)]
        spans = [self.graph.exact_spans((starts[a], starts[a] + tile[a]), a, sizes) for a in range(2)]
        layers = []
        for index in self.graph.window_steps:
            step, stride = self.graph.steps[index], self.strides[index]
            lost, fields = [], []
            for axis in range(2):
                lo, hi = spans[axis][index]
                lost.append((lo * stride[axis] - starts[axis], starts[axis] + tile[axis] - hi * stride[axis]))
                mid = sizes[index][axis] // 2
                a, b = self.graph.needed_span((mid, mid + 1), axis, sizes, at=index)
                fields.append(b - a)
            lost_sides = tuple(_simplest(side) for side in (lost[0][0], lost[1][0], lost[0][1], lost[1][1]))
            layers.append(LayerProfile(step.path, stride, (fields[0], fields[1]), lost_sides))  # type: ignore[arg-type]
        return layers


def _balanced(cells: list[Span], fits: Callable[[int, int], bool]) -> list[Span]:
    """The same number of cells as the greedy ``cells``, with outputs spread evenly over them.

    Greedy filling leaves a sliver for the last tile; even cells compute the same outputs with
    tiles of similar, smaller shapes. Interior cells are made all the same size where the two
    border cells (whose tiles read the image's own padding, so need less) can take the
    remainder: equal interior tiles run the same operations and can run as one batch
    (:mod:`lightstream.core.batching`). Falls back to ``cells`` if an even cell does not fit.
    """
    count, length = len(cells), cells[-1][1]
    size, extra = divmod(length, count)
    sizes = [size] * count
    sizes[0] += extra // 2
    sizes[-1] += extra - extra // 2
    bounds = [length * i // count for i in range(count + 1)]
    for candidate in ([sum(sizes[:i]) for i in range(count + 1)], bounds):
        even = list(zip(candidate, candidate[1:]))
        if all(fits(lo, hi) for lo, hi in even):
            return even
    return cells
