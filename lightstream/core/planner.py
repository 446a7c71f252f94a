"""Planning: from a trunk, an image shape and the settings to an immutable :class:`StreamPlan`.

The pipeline is *trunk → trace → plan → execute*. A :class:`Planner` holds one trace of a trunk
(its :class:`~lightstream.core.graph.TrunkGraph` and :class:`~lightstream.core.geometry.Geometry`)
and turns a :class:`PlanRequest` — image shape, tile size, stage policy, stage memory — into a
:class:`StreamPlan`: the stages, each with its tile size, tile plan and how many of its tiles may
run as one batch. On a GPU, where each op of a run is a kernel launch, the ``stage_memory`` the
stitched maps (kept stage maps and the trunk's output, with their gradients) leave over is spent
on fewer runs of the trunk's steps: the deepest stages whose whole maps fit run as one tile and
keep their graph for the backward (no recompute), the other later stages get the tile shapes that
need the fewest runs (full-width bands where few tiles cross the map), and tiles of equal shape
run as one batch (``tile_batch="auto"``), so that one run never holds more than one tile of the
user's size plus that spare memory. On the CPU fewer runs are not faster, so no run holds more
than one tile of the user's size there, and tile shapes are chosen for the least overlap. A
stage streamed in several tiles also gets a plan of its own for the forward, which keeps no graph:
larger tiles in the same memory (fewer runs, less overlap), chosen by the device's time model.
The cost model (values and multiply-adds per pixel of every step, by default measured by a
shape-only probe, :func:`~lightstream.core.stages.stage_costs`) is an argument of the planner,
because it decides which stage maps are kept and how large later stages' tiles are. The engine
only executes plans.

A trace bakes in what the trunk's modules were when it was made: which modules, their train/eval
modes, their plain attributes (a convolution's ``stride``, a user module's flags) and which
parameter objects they hold. :class:`TraceCache` keys traces by all of that (:func:`trace_key`),
so changing any of it traces the trunk again instead of running a stale graph.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .checks import StagePolicy
from .estimate import LayerCost, TimeModel, pass_time
from .geometry import Geometry, TilePlan
from .graph import TrunkGraph
from .stages import (
    Stage,
    StagePlan,
    candidate_cuts,
    forward_values,
    split_stages,
    stage_costs,
    stage_tile_size,
    tile_areas,
    tile_values,
)

__all__ = ["CostModel", "PlanRequest", "Planner", "StreamPlan", "TraceCache", "spends_spare_memory", "trace_key"]

logger = logging.getLogger(__name__)

CostModel = Callable[[Sequence[Stage], int], list[list[LayerCost]]]
"""Per stage, per step: values and multiply-adds per output pixel, for ``in_channels`` input channels."""

_SIMPLE = (bool, int, float, complex, str, bytes, type(None))


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on besides the traced trunk (the plan cache's key)."""

    image_size: tuple[int, int]
    batch: int
    channels: int
    itemsize: int
    tile_size: tuple[int, int]
    stages: StagePolicy
    stage_memory: int
    tile_batch: int | str = "auto"
    time_model: TimeModel = TimeModel()  # noqa: RUF009 (frozen: one shared default is safe)
    """The device's costs, which choose the forward's own tiles
    (:attr:`~lightstream.core.stages.StagePlan.forward_plan`)."""
    spend_spare: bool = True
    """Whether what the stitched maps leave of ``stage_memory`` buys larger runs. On a GPU each op
    of a run is a kernel launch, so fewer runs are faster; on the CPU they are not (the work is
    the same and larger tensors cost fresh pages), so there every run holds at most one tile of
    the user's size and the step's memory stays set by the tile (:func:`spends_spare_memory`)."""


@dataclass(frozen=True)
class StreamPlan:
    """How one image shape streams: the stages in order, each with its tile size and tile plan."""

    request: PlanRequest
    stages: tuple[StagePlan, ...]

    @property
    def output_size(self) -> tuple[int, int]:
        """``(h, w)`` of the stitched feature map."""
        return self.stages[-1].plan.output_size

    @property
    def first(self) -> TilePlan:
        """The tiles over the image (the first stage's plan)."""
        return self.stages[0].plan


class Planner:
    """Plans one trace of a trunk; plans are immutable and cached by :class:`PlanRequest`.

    Args:
        trunk: the trunk as it is now (traced here, once).
        cost_model: per-stage layer costs, which size later stages' tiles and choose the kept
            stage maps under ``stage_memory`` (default: the shape-only probe of
            :func:`~lightstream.core.stages.stage_costs`).
    """

    def __init__(self, trunk: nn.Module, cost_model: CostModel = stage_costs) -> None:
        self.trunk = trunk
        self.cost_model = cost_model
        self.geometry = Geometry(TrunkGraph(trunk))
        self._stages: dict[tuple[int, ...], list[Stage]] = {}
        self._costs: dict[tuple[tuple[str, ...], int], list[list[LayerCost]]] = {}
        self._plans: dict[PlanRequest, StreamPlan] = {}
        self._candidates: list[int] | None = None

    @property
    def candidates(self) -> list[int]:
        """Child indices after which the trunk has just downsampled (``[]`` if not sequential)."""
        if self._candidates is None:
            self._candidates = candidate_cuts(self.trunk)
        return self._candidates

    def stages(self, cuts: tuple[int, ...]) -> list[Stage]:
        """The trunk cut before each child index in ``cuts`` (``()``: the whole trunk)."""
        if not cuts:
            return [Stage("trunk", self.trunk, self.geometry.graph, self.geometry, (1, 1))]  # type: ignore[arg-type]
        if cuts not in self._stages:
            self._stages[cuts] = split_stages(self.trunk, cuts)
        return self._stages[cuts]

    def costs(self, stages: Sequence[Stage], channels: int) -> list[list[LayerCost]]:
        """The cost model's layer costs of ``stages`` fed ``channels`` input channels."""
        key = (tuple(stage.name for stage in stages), channels)
        if key not in self._costs:
            self._costs[key] = self.cost_model(stages, channels)
        return self._costs[key]

    def first_stage(self, policy: StagePolicy) -> Stage:
        """The smallest first stage ``policy`` can make: its receptive field bounds the tile size."""
        if policy is None:
            return self.stages(())[0]
        cuts = tuple(self.candidates[:1]) if policy == "auto" else policy
        return self.stages(cuts)[0]  # type: ignore[arg-type]

    def plan(self, request: PlanRequest) -> StreamPlan:
        """The stages and tile plans for ``request`` (cached)."""
        if request not in self._plans:
            self._plans[request] = self._make_plan(request)
        return self._plans[request]

    def _make_plan(self, request: PlanRequest) -> StreamPlan:
        if request.stages is None:
            stage = self.stages(())[0]
            plan = stage.geometry.plan(request.image_size, request.tile_size)
            costs = self.costs([stage], request.channels)[0]
            # a trunk streamed in one piece keeps no maps: one tile plus what the output leaves
            tile_bytes = tile_values(stage, costs, request.tile_size) * request.batch * request.itemsize
            room = tile_bytes + (max(0, request.stage_memory - self._output_bytes(request)) if request.spend_spare
                                 else 0)
            limit = partial(self._tile_batch, request, [stage], 0, request.tile_size, room)
            forward = partial(self._forward_tiles, request, stage, costs, request.image_size, plan, room)
            return StreamPlan(request, (StagePlan(stage, request.tile_size, plan, limit, forward, int(tile_bytes)),))
        cuts = self._auto_cuts(request) if request.stages == "auto" else request.stages
        stages = self.stages(tuple(cuts))  # type: ignore[arg-type]
        costs = self.costs(stages, request.channels)
        whole = self.stages(())[0]
        per_value = request.batch * request.itemsize
        budget = tile_values(whole, self.costs([whole], request.channels)[0], request.tile_size)
        held = sum(self._map_bytes(stages, costs, request)) + self._output_bytes(request)
        spare = max(0.0, request.stage_memory - held) / per_value if request.spend_spare else 0.0
        sizes = [request.image_size]
        for stage in stages[:-1]:
            sizes.append(stage.geometry.output_size(sizes[-1]))
        # The deepest stages whose whole maps fit the tile budget plus the spare stage memory may
        # run as one tile each and keep their graphs from the forward (no recompute). A kept graph
        # lives while every later stage runs, so the kept graphs share the spare; the stages before
        # them never run beside a kept graph and get the rest as larger tiles. Of the choices, the
        # one with the fewest runs of a step (the fewest dispatched operations) wins.
        choices, kept = [], 0.0
        for first_kept in range(len(stages), 0, -1):
            if first_kept < len(stages):
                kept += tile_values(stages[first_kept], costs[first_kept], sizes[first_kept])
                if kept > budget + spare:
                    break
            plans = self._stage_plans(request, stages, costs, sizes, first_kept, budget + spare,
                                      max(budget, budget + spare - kept))
            if plans is not None:
                choices.append(plans)
        if not choices:  # a stage's smallest tile exceeds it: every stage as its tile budget says
            choices.append(self._stage_plans(request, stages, costs, sizes, len(stages), budget, budget, False))
        plans = min(choices, key=_step_runs)  # type: ignore[arg-type]
        logger.debug("stages %s with tiles %s", [p.stage.name for p in plans], [p.tile_size for p in plans])
        return StreamPlan(request, tuple(plans))

    def _stage_plans(self, request: PlanRequest, stages: list[Stage], costs: list[list[LayerCost]],
                     sizes: list[tuple[int, int]], first_kept: int, limit: float, room: float,
                     check: bool = True) -> list[StagePlan] | None:
        """Plans of ``stages``: the first tiles the image with the user's tile, those from
        ``first_kept`` on are one tile of their whole map, the others get the largest tile that
        fits ``room`` values. ``None`` when a stage's tile and the graphs kept before it exceed
        ``limit`` values (and ``check``)."""
        per_value = request.batch * request.itemsize
        plans: list[StagePlan] = []
        held = 0.0  # values of the graphs kept by the stages so far
        for index, (stage, stage_cost) in enumerate(zip(stages, costs)):
            if index == 0:
                tile = request.tile_size
            elif index >= first_kept:
                tile = (max(sizes[index][0], 1), max(sizes[index][1], 1))
            else:
                tile = stage_tile_size(stage, stage_cost, room, sizes[index], fewest_runs=request.spend_spare)
            plan = stage.geometry.plan(sizes[index], tile)
            values = tile_values(stage, stage_cost, tile)
            if check and index > 0 and held + values > limit:
                return None
            run_bytes = max(values, limit - held) * per_value  # what one run may hold
            limit_batch = partial(self._tile_batch, request, stages, index, tile, run_bytes)
            forward = partial(self._forward_tiles, request, stage, stage_cost, sizes[index], plan, run_bytes)
            plans.append(StagePlan(stage, tile, plan, limit_batch, forward, int(values * per_value)))
            held += values if len(plan) == 1 else 0.0
        return plans

    def _forward_tiles(self, request: PlanRequest, stage: Stage, costs: list[LayerCost], size: tuple[int, int],
                       plan: TilePlan, room: float) -> tuple[TilePlan | None, int]:
        """The forward's own tiles for a stage streamed in several tiles, and how many one run holds.

        A forward without a graph saves nothing, so ``room`` bytes hold a larger tile than the
        backward's: fewer runs and less overlap. Of the fewest tiles that fit, the fewest whose
        outputs stay below the time model's fresh-memory threshold, and the backward's own tiles,
        the fastest by the time model wins (on the CPU a tile past glibc's mmap threshold pays for
        fresh pages; a GPU counts multiply-adds). ``(None, 1)``: the backward's tiles, or
        ``tile_batch`` set by hand (then every run holds the tiles the user asked for).
        """
        if len(plan) == 1 or request.tile_batch != "auto":
            return None, 1
        per_value = request.batch * request.itemsize
        model = request.time_model
        threshold = model.fresh_memory_threshold / per_value

        def below_threshold(stage: Stage, costs: list[LayerCost], tile: tuple[int, int]) -> float:
            areas = tile_areas(stage, tile)
            if any(costs[i].elements_per_pixel * area >= threshold for i, area in areas.items()):
                return math.inf
            return forward_values(stage, costs, tile)

        choices: dict[tuple[int, int], TilePlan] = {plan.tile_size: plan}
        for values in (forward_values, below_threshold):
            tile = stage_tile_size(stage, costs, room / per_value, size, values, request.spend_spare)
            if values(stage, costs, tile) <= room / per_value and tile not in choices:
                choices[tile] = stage.geometry.plan(size, tile)
        best = min(choices.values(),
                   key=lambda p: (pass_time(stage.graph, p, costs, model, per_value), len(p)))
        if len(best) >= len(plan):
            return None, 1
        tile_bytes = max(1.0, forward_values(stage, costs, best.tile_size) * per_value)
        return best, max(1, int(room // tile_bytes))

    def _tile_batch(self, request: PlanRequest, stages: list[Stage], index: int, tile: tuple[int, int],
                    room: float) -> int:
        """Tiles one run of ``stages[index]`` may hold: ``tile_batch``, or with ``"auto"`` as many as
        ``room`` bytes hold (at least one), one tile's backward peak each."""
        if request.tile_batch != "auto":
            return int(request.tile_batch)
        costs = self.costs(stages, request.channels)[index]
        tile_bytes = request.batch * request.itemsize * tile_values(stages[index], costs, tile)
        return max(1, int(room // max(1.0, tile_bytes)))

    @staticmethod
    def _map_bytes(stages: Sequence[Stage], costs: list[list[LayerCost]], request: PlanRequest) -> list[int]:
        """Bytes of each kept stage map with its gradient (the output of every stage but the last)."""
        map_size, out = request.image_size, []
        for stage, stage_cost in zip(stages[:-1], costs[:-1]):
            map_size = stage.geometry.output_size(map_size)
            per_pixel = stage_cost[stage.graph.output].elements_per_pixel
            out.append(2 * request.batch * per_pixel * map_size[0] * map_size[1] * request.itemsize)
        return out

    def _output_bytes(self, request: PlanRequest) -> int:
        """Bytes of the stitched output map with its gradient (held beside every stage's tiles)."""
        whole = self.stages(())[0]
        per_pixel = self.costs([whole], request.channels)[0][whole.graph.output].elements_per_pixel
        height, width = self.geometry.output_size(request.image_size)
        return 2 * request.batch * per_pixel * height * width * request.itemsize

    def _auto_cuts(self, request: PlanRequest) -> list[int]:
        """Deepest candidate cuts whose kept maps (and their gradients) fit ``stage_memory``."""
        candidates = self.candidates
        if not candidates:
            return []
        stages = self.stages(tuple(candidates))
        kept_bytes = self._map_bytes(stages, self.costs(stages, request.channels), request)
        chosen: list[int] = []
        used = self._output_bytes(request)
        for cut, need in reversed(list(zip(candidates, kept_bytes))):
            if used + need > request.stage_memory:
                break
            chosen.insert(0, cut)
            used += need
        return self._cut_for_tile(chosen, request.tile_size)

    def _cut_for_tile(self, chosen: list[int], tile: tuple[int, int]) -> list[int]:
        """Add shallower cuts until the first stage's receptive field fits the tile."""
        field = self.stages(tuple(chosen))[0].geometry.receptive_field
        while field[0] > tile[0] or field[1] > tile[1]:
            shallower = [c for c in self.candidates if not chosen or c < chosen[0]]
            if not shallower:
                break
            chosen.insert(0, shallower[-1])
            logger.warning("stage maps exceed stage_memory: cutting at child %d anyway, because the "
                           "tile %s is smaller than the first stage's receptive field", chosen[0], tile)
            field = self.stages(tuple(chosen))[0].geometry.receptive_field
        return chosen


def spends_spare_memory(device: torch.device) -> bool:
    """Whether plans for ``device`` spend spare stage memory on larger runs (see :class:`PlanRequest`)."""
    return device.type != "cpu"


def _step_runs(plans: list[StagePlan]) -> int:
    """How many times the plans run a step: a stage of several tiles runs each tile twice
    (forward, and again for the backward), a stage of one tile keeps its graph and runs once."""
    return sum(len(p.stage.graph.steps) * (1 if len(p.plan) == 1 else 2 * len(p.plan)) for p in plans)


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a module attribute's value (identity for objects)."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_frozen(v) for v in value)
    return ("object", id(value))


def trace_key(trunk: nn.Module) -> tuple:
    """What a trace of ``trunk`` bakes in: modules, modes, plain attributes and tensor objects.

    Tensors' *values* are not part of it (a trace reads parameters when it runs); which
    parameter or buffer object a module holds is, since replacing one can change shapes.
    """
    return tuple(
        (name, id(module), module.training,
         tuple((k, _frozen(v)) for k, v in vars(module).items() if not k.startswith("_") and k != "training"),
         tuple(id(t) for t in module._parameters.values()), tuple(id(t) for t in module._buffers.values()))
        for name, module in trunk.named_modules())


class TraceCache:
    """The planners of the last few states of one trunk (see :func:`trace_key`).

    Switching between train and eval every epoch therefore does not trace again, while a
    changed attribute or replaced module is traced afresh.
    """

    def __init__(self, trunk: nn.Module, cost_model: CostModel = stage_costs, kept: int = 4) -> None:
        self.trunk = trunk
        self.cost_model = cost_model
        self.kept = kept
        self._planners: dict[tuple, Planner] = {}

    def current(self) -> Planner:
        """The planner of the trunk as it is now (traced on first use of this state)."""
        key = trace_key(self.trunk)
        planner = self._planners.get(key)
        if planner is None:
            if self._planners:
                logger.debug("the trunk's modules, modes or attributes changed: tracing it again")
            if len(self._planners) >= self.kept:
                self._planners.pop(next(iter(self._planners)))
            planner = self._planners[key] = Planner(self.trunk, self.cost_model)
        return planner
