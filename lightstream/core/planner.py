"""Planning: from a trunk, an image shape and the settings to an immutable :class:`StreamPlan`.

The pipeline is *trunk → trace → plan → execute*. A :class:`Planner` holds one trace of a trunk
(its :class:`~lightstream.core.graph.TrunkGraph` and :class:`~lightstream.core.geometry.Geometry`)
and turns a :class:`PlanRequest` — image shape, tile size, stage policy, stage memory — into a
:class:`StreamPlan`: the stages, each with its tile size, tile plan and how many of its tiles may
run as one batch (``tile_batch``: with ``"auto"``, as many as the ``stage_memory`` the kept
stage maps leave over holds, one tile's backward peak each). The cost model (values
and multiply-adds per pixel of every step, by default measured by a shape-only probe,
:func:`~lightstream.core.stages.stage_costs`) is an argument of the planner, because it decides
which stage maps are kept and how large later stages' tiles are. The engine only executes plans.

A trace bakes in what the trunk's modules were when it was made: which modules, their train/eval
modes, their plain attributes (a convolution's ``stride``, a user module's flags) and which
parameter objects they hold. :class:`TraceCache` keys traces by all of that (:func:`trace_key`),
so changing any of it traces the trunk again instead of running a stale graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .checks import StagePolicy
from .estimate import LayerCost
from .geometry import Geometry, TilePlan
from .graph import TrunkGraph
from .stages import Stage, StagePlan, candidate_cuts, split_stages, stage_costs, stage_tile_size, tile_values

__all__ = ["CostModel", "PlanRequest", "Planner", "StreamPlan", "TraceCache", "trace_key"]

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
            limit = partial(self._tile_batch, request, [stage], 0, request.tile_size, request.stage_memory)
            return StreamPlan(request, (StagePlan(stage, request.tile_size, plan, limit),))
        cuts = self._auto_cuts(request) if request.stages == "auto" else request.stages
        stages = self.stages(tuple(cuts))  # type: ignore[arg-type]
        costs = self.costs(stages, request.channels)
        whole = self.stages(())[0]
        budget = tile_values(whole, self.costs([whole], request.channels)[0], request.tile_size)
        spare = request.stage_memory - sum(self._map_bytes(stages, costs, request))
        plans: list[StagePlan] = []
        map_size = request.image_size
        for index, (stage, stage_cost) in enumerate(zip(stages, costs)):
            # The first stage tiles the image with the user's tile; later stages get the largest
            # tile that needs no more memory than one unstaged tile of the user's size.
            tile = request.tile_size if index == 0 else stage_tile_size(stage, stage_cost, budget, map_size)
            plan = stage.geometry.plan(map_size, tile)
            plans.append(StagePlan(stage, tile, plan, partial(self._tile_batch, request, stages, index, tile, spare)))
            map_size = plan.output_size
        logger.debug("stages %s with tiles %s", [p.stage.name for p in plans], [p.tile_size for p in plans])
        return StreamPlan(request, tuple(plans))

    def _tile_batch(self, request: PlanRequest, stages: list[Stage], index: int, tile: tuple[int, int],
                    spare: int) -> int:
        """Tiles one run of ``stages[index]`` may hold: ``tile_batch``, or with ``"auto"`` one tile
        plus as many more as the ``stage_memory`` the kept stage maps leave over (``spare``) holds."""
        if request.tile_batch != "auto":
            return int(request.tile_batch)
        costs = self.costs(stages, request.channels)[index]
        tile_bytes = request.batch * request.itemsize * tile_values(stages[index], costs, tile)
        return 1 + int(max(0, spare) // max(1.0, tile_bytes))

    @staticmethod
    def _map_bytes(stages: Sequence[Stage], costs: list[list[LayerCost]], request: PlanRequest) -> list[int]:
        """Bytes of each kept stage map with its gradient (the output of every stage but the last)."""
        map_size, out = request.image_size, []
        for stage, stage_cost in zip(stages[:-1], costs[:-1]):
            map_size = stage.geometry.output_size(map_size)
            per_pixel = stage_cost[stage.graph.output].elements_per_pixel
            out.append(2 * request.batch * per_pixel * map_size[0] * map_size[1] * request.itemsize)
        return out

    def _auto_cuts(self, request: PlanRequest) -> list[int]:
        """Deepest candidate cuts whose kept maps (and their gradients) fit ``stage_memory``."""
        candidates = self.candidates
        if not candidates:
            return []
        stages = self.stages(tuple(candidates))
        kept_bytes = self._map_bytes(stages, self.costs(stages, request.channels), request)
        chosen: list[int] = []
        used = 0
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
