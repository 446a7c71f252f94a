"""Staged streaming: cut a sequential trunk at its downsampling boundaries.

Streaming the whole trunk at once makes every tile pay the receptive field of the *whole*
trunk in overlap (435 px for ResNet-18). Cutting the trunk into stages, keeping each stage's
stitched output map, and streaming each stage separately makes each stage pay only its own
small receptive field, so overlap (and recompute) nearly vanishes. The price is memory: each
kept map (and its gradient, in the backward) grows with the image area. ``stages="auto"``
keeps the deepest (smallest) maps that fit ``stage_memory`` bytes beside the trunk's stitched
output map and its gradient (by default 1.25 GiB, or a sixteenth of a GPU's memory when that is
more: :func:`default_stage_memory`); ``stages=[...]``
names the cut points; ``stages=None`` streams the trunk as one stage (memory flat in image size).

Each stage gets its own tile, sized so that one tile of any stage needs about as much memory
as one tile of the first stage at the user's tile size, plus on a GPU what the kept maps leave of
``stage_memory`` (:mod:`lightstream.core.planner`): memory stays set by the tile and ``stage_memory``.
A stage's forward, which keeps no graph, may run larger tiles in that memory (:class:`StagePlan`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .batching import TileBatch, batch_tiles
from .estimate import LayerCost, layer_costs, pass_peaks
from .geometry import Geometry, TilePlan
from .graph import TrunkGraph

MIN_CUT_STRIDE = 4
MIN_STAGE_MEMORY = 5 << 28  # 1.25 GiB
GPU_STAGE_MEMORY_FRACTION = 1 / 16
MAX_BANDS = 4

__all__ = ["Stage", "StagePlan", "split_stages", "candidate_cuts", "stage_tile_size", "stage_costs",
           "tile_values", "forward_values", "tile_areas", "default_stage_memory"]


def default_stage_memory(device: torch.device) -> int:
    """Bytes the kept stage maps (and their gradients) may use when ``stage_memory="auto"``.

    1.25 GiB, or on a CUDA device a sixteenth of its memory when that is more (5 GiB on an 80 GiB
    card): the GPU holds the maps, and every further cut saves recompute (ResNet-34 at 8192² on
    an H200: 3.1x the whole-image step with 1 GiB, 2.0x with 4 GiB). It counts the stitched maps a
    step holds besides its tiles: the kept stage maps and the trunk's output map, with their
    gradients; what they leave is spent on fewer, larger runs (:mod:`lightstream.core.planner`).
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(MIN_STAGE_MEMORY, int(total * GPU_STAGE_MEMORY_FRACTION))
    return MIN_STAGE_MEMORY


@dataclass
class Stage:
    """A contiguous run of a sequential trunk's children, streamed on its own."""

    name: str
    module: nn.Sequential
    graph: TrunkGraph
    geometry: Geometry
    input_stride: tuple[int, int]


@dataclass(frozen=True)
class StagePlan:
    """The tile plan of one stage, in the pixels of that stage's input map, and how its tiles
    run: :attr:`batches` partition the plan's tiles into batches run at once (see
    :mod:`lightstream.core.batching`; worked out when first run, so planning stays fast)."""

    stage: Stage
    tile_size: tuple[int, int]
    plan: TilePlan
    batch_limit: Callable[[], int] = field(default=lambda: 1, compare=False, repr=False)
    """The most tiles one run may hold (called once, when the batches are first needed)."""
    forward_tiles: Callable[[], tuple[TilePlan | None, int]] = field(default=lambda: (None, 1), compare=False,
                                                                     repr=False)
    """The forward's own tile plan and the most of its tiles one run may hold (called once, when
    first needed): see :attr:`forward_plan`."""
    tile_bytes: int = 0
    """Bytes one tile of :attr:`plan` holds at its backward's peak (the planner's cost model; 0 if
    not worked out)."""

    @cached_property
    def batches(self) -> tuple[TileBatch, ...]:
        """The plan's tiles in the batches that run at once."""
        return batch_tiles(self.stage.graph, self.plan, self.batch_limit())

    @cached_property
    def _forward(self) -> tuple[TilePlan | None, int]:
        return self.forward_tiles()

    @property
    def forward_plan(self) -> TilePlan | None:
        """The tiles of the forward without a graph, where they are larger than :attr:`plan`'s: such
        a run holds no saved values, so the same memory holds a larger tile (fewer runs, less
        overlap). ``None``: the forward runs :attr:`plan`'s tiles."""
        return self._forward[0]

    @cached_property
    def forward_batches(self) -> tuple[TileBatch, ...]:
        """The batches of the forward without a graph (of :attr:`forward_plan`, else :attr:`batches`)."""
        plan, limit = self._forward
        return self.batches if plan is None else batch_tiles(self.stage.graph, plan, limit)

    def forward_runs(self, in_memory: bool) -> tuple[TileBatch, ...]:
        """The batches the forward without a graph runs: :attr:`forward_batches` over an image or
        map in memory; over a lazy source (a slide read from disk) :attr:`batches`, so that no
        read is larger than the user's tile."""
        return self.forward_batches if in_memory else self.batches

    @property
    def forward_tile_batch(self) -> int:
        """The most tiles one run of the forward without a graph holds."""
        return max(len(batch) for batch in self.forward_batches)

    @property
    def tile_batch(self) -> int:
        """The most tiles one run of this stage holds."""
        return max(len(batch) for batch in self.batches)


def split_stages(trunk: nn.Module, cuts: Sequence[int]) -> list[Stage]:
    """Stages of ``trunk`` cut before each child index in ``cuts`` (module paths are kept)."""
    children = list(trunk.named_children())
    bounds = [0, *sorted(set(cuts)), len(children)]
    stages: list[Stage] = []
    stride = (1, 1)
    for start, stop in zip(bounds, bounds[1:]):
        module = nn.Sequential(OrderedDict(children[start:stop]))
        graph = TrunkGraph(module)
        geometry = Geometry(graph)
        name = children[start][0] if stop - start == 1 else f"{children[start][0]}..{children[stop - 1][0]}"
        stages.append(Stage(name, module, graph, geometry, stride))
        stride = (stride[0] * geometry.output_stride[0], stride[1] * geometry.output_stride[1])
    return stages


def candidate_cuts(trunk: nn.Module) -> list[int]:
    """Child indices after which the map has just been downsampled (and is not the output).

    Only maps downsampled at least ``MIN_CUT_STRIDE`` times are worth keeping (a map at half
    resolution costs more memory than the overlap it saves); ``[]`` for non-sequential trunks.
    """
    if not isinstance(trunk, nn.Sequential):
        return []
    children = list(trunk.children())
    cuts = []
    total = (1, 1)
    for index, child in enumerate(children[:-1]):
        stride = Geometry(TrunkGraph(nn.Sequential(child))).output_stride
        total = (total[0] * stride[0], total[1] * stride[1])
        if stride != (1, 1) and min(total) >= MIN_CUT_STRIDE:
            rest = Geometry(TrunkGraph(nn.Sequential(*children[index + 1:])))
            if rest.receptive_field != (1, 1) or rest.output_stride != (1, 1):  # else nothing to stream
                cuts.append(index + 1)
    return cuts


def tile_values(stage: Stage, costs: list[LayerCost], tile: tuple[int, int]) -> float:
    """Values an interior tile of ``tile`` pixels holds at the peak of its backward (per image)."""
    return pass_peaks(stage.graph, costs, tile_areas(stage, tile))[1]


def tile_areas(stage: Stage, tile: tuple[int, int]) -> dict[int, int]:
    """Each spatial step's area in an interior tile of ``tile`` pixels."""
    strides = stage.geometry.strides
    return {index: math.ceil(tile[0] / strides[index][0]) * math.ceil(tile[1] / strides[index][1])
            for index, step in enumerate(stage.graph.steps) if step.spatial}


def forward_values(stage: Stage, costs: list[LayerCost], tile: tuple[int, int]) -> float:
    """Values an interior tile of ``tile`` pixels holds at the peak of a forward without a graph."""
    return pass_peaks(stage.graph, costs, tile_areas(stage, tile))[0]


def stage_tile_size(stage: Stage, costs: list[LayerCost], budget: float, map_size: tuple[int, int],
                    values: Callable[[Stage, list[LayerCost], tuple[int, int]], float] = tile_values,
                    fewest_runs: bool = True) -> tuple[int, int]:
    """The tile of ``stage`` whose ``values`` (by default its backward's peak, :func:`tile_values`)
    fit ``budget`` and that covers ``map_size`` in the fewest tiles (``fewest_runs``), else with
    the least overlap; at least its receptive field.

    The candidates: the largest square tile, and for each count of tiles along one axis up to
    ``MAX_BANDS``, the tile as short along that axis as the count allows and as long along the
    other as the budget leaves (a full-width band is one; where more tiles cross an axis, bands
    save little over squares). On a GPU every run is a sequence of kernel launches, so the fewest
    tiles win, then the least area they cover together (the overlap); on the CPU the least area
    wins, then the fewest tiles.
    """
    geometry = stage.geometry
    field = geometry.receptive_field
    full = (max(field[0], map_size[0]), max(field[1], map_size[1]))
    along: dict[tuple[int, int], tuple[int, int]] = {}

    def cover(axis: int, length: int) -> tuple[int, int]:
        """Tiles of ``length`` along ``axis`` and the pixels they read together (0, 0: too short)."""
        if (axis, length) not in along:
            along[axis, length] = geometry.tiles_along(map_size, axis, length) or (0, 0)
        return along[axis, length]

    def longest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
        """The largest length in ``[low, high]`` that ``fits`` (monotone), ``None`` if none does."""
        if not fits(low):
            return None
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return high if fits(high) else low

    def fits_budget(tile: tuple[int, int]) -> bool:
        return values(stage, costs, tile) <= budget

    side = longest(lambda n: fits_budget((n, n)), max(field), max(full)) or max(field)
    square = (max(field[0], min(side, full[0])), max(field[1], min(side, full[1])))
    candidates = {square}
    for axis in range(2):
        other = 1 - axis
        for n in range(1, min(cover(axis, square[axis])[0], MAX_BANDS + 1)):
            length = max(field[axis], min(full[axis], geometry.tile_length(map_size, axis, n)))

            def fits_other(m: int, length: int = length, axis: int = axis) -> bool:
                return fits_budget((length, m) if axis == 0 else (m, length))
            across = longest(fits_other, field[other], full[other])
            if across is not None:
                candidates.add((length, across) if axis == 0 else (across, length))

    def cost(tile: tuple[int, int]) -> tuple[int, int]:
        (rows, height), (cols, width) = cover(0, tile[0]), cover(1, tile[1])
        return (rows * cols, height * width) if fewest_runs else (height * width, rows * cols)

    return min(sorted(candidates), key=cost)


def stage_costs(stages: list[Stage], in_channels: int) -> list[list[LayerCost]]:
    """Layer costs of each stage, feeding each stage the channel count the previous one outputs."""
    out, channels = [], in_channels
    for stage in stages:
        costs = layer_costs(stage.graph, channels)
        out.append(costs)
        channels = costs[stage.graph.output].elements_per_pixel
    return out
