"""Predicted memory and time of a streamed training step, from the geometry alone.

Nothing here runs the network on real data. One shape-only pass (``FakeTensorMode``) per stage
records, per step, how many values the step outputs and how many autograd keeps for the
backward (per output pixel); the tile plans give every step's area. The benchmark prints these
predictions next to measurements so they stay honest.

The memory model, in values per image of the batch:

* a tile's backward runs its steps in reverse: when a step runs, the values saved by the steps
  before it are still held, plus the gradients of its output and its input;
* a staged step additionally holds the stage maps computed so far (a stage's input map lives
  until that stage's backward is done), the gradient map flowing into the current stage and
  the one it produces, and the stitched feature map with its gradient;
* a stage of one tile keeps its autograd graph from its forward to its backward (no
  recomputation), so its saved values count in between;
* the whole-image step is the same backward over the whole image.

Parameter gradients add twice the parameters (the accumulated gradient and one tile's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .geometry import TilePlan
from .graph import TrunkGraph, module_device, parameter_dtype

__all__ = ["StepEstimate", "LayerCost", "layer_costs", "estimate_step", "pass_peaks"]


@dataclass(frozen=True)
class LayerCost:
    """Per output pixel of one step: values it outputs, values autograd saves, multiply-adds."""

    elements_per_pixel: int
    macs_per_pixel: int
    saved_per_pixel: float = 0.0


@dataclass(frozen=True)
class StepEstimate:
    """Prediction for one training step (forward + backward) on one batch.

    Memory figures are what the step adds to the process that already holds the model, the
    image and the framework.

    Attributes:
        tiles: number of tiles (all stages).
        recompute_factor: streamed multiply-adds of one pass over the whole image's (1.0 = no
            overlap).
        relative_time: streamed step time over the whole-image step time: a streamed stage
            runs its tiles twice (forward, then again with the backward: 4 units of work to
            the whole image's 3), a stage of one tile keeps its graph and runs once.
        peak_bytes: the streamed step's peak (see the module docstring).
        whole_image_bytes: the conventional step's peak (every saved value of the whole image).
        feature_map_bytes: the stitched feature map alone.
        stage_map_bytes: the kept stage maps (0 when the trunk streams in one piece).
    """

    tiles: int
    recompute_factor: float
    relative_time: float
    peak_bytes: int
    whole_image_bytes: int
    feature_map_bytes: int
    stage_map_bytes: int = 0


def layer_costs(graph: TrunkGraph, in_channels: int, probe: int = 64) -> list[LayerCost]:
    """Per step of ``graph``: output, saved values and multiply-adds per output pixel.

    Runs the graph once on a fake (shape-only) tensor with gradients enabled and counts the
    distinct tensors autograd saves for the backward (parameters, buffers and the input
    excluded), attributing each to the step that saved it.
    """
    macs: dict[int, int] = {}
    for index, step in enumerate(graph.steps):
        module = step.target if isinstance(step.target, nn.Module) else None
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(weight, torch.Tensor):
            macs[index] = weight.numel()
    elements: dict[int, int] = {}
    saved: dict[int, float] = {}
    seen: set[int] = set()
    pending = [0]  # bytes saved since the last observed step

    size = max(probe, *graph_min_size(graph))
    dtype = parameter_dtype(graph.trunk)
    device = module_device(graph.trunk)  # the probe tile must be where the trunk is (fake tensors keep devices apart)
    itemsize = torch.empty(0, dtype=dtype).element_size()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, FakeTensor):  # a parameter or buffer: the model holds it anyway
            return tensor
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            pending[0] += storage.nbytes()
        return tensor

    def observe(index: int, value: torch.Tensor) -> None:
        h, w = (value.shape[d] for d in graph.steps[index].dims)
        pixels = max(1, h * w * value.shape[0])
        elements[index] = value.numel() // pixels
        saved[index] = pending[0] / itemsize / pixels
        pending[0] = 0

    autocast_off = [torch.autocast(kind, enabled=False) for kind in ("cpu", "cuda")
                    if torch.is_autocast_enabled(kind)]  # shapes only: no casts, no data
    with FakeTensorMode(allow_non_fake_inputs=True), contextlib.ExitStack() as stack:
        for context in autocast_off:
            stack.enter_context(context)
        tile = torch.empty(1, in_channels, size, size, dtype=dtype, device=device, requires_grad=True)
        seen.add(tile.untyped_storage()._cdata)  # the input is the caller's
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor))
        graph.run(tile, (0, size), (0, size), graph.sizes(size, size), observe)
    return [LayerCost(elements.get(i, 0), macs.get(i, elements.get(i, 0)), saved.get(i, 0.0))
            for i in range(len(graph.steps))]


def graph_min_size(graph: TrunkGraph) -> tuple[int, int]:
    """An image size large enough for every step to have a non-empty output."""
    size = 1
    while min(graph.sizes(size, size)[graph.output]) < 1:
        size *= 2
    return size, size


@dataclass(frozen=True)
class _StagePass:
    """One stage's numbers in values per image: work, tile peaks and map sizes."""

    tiles: int
    tile_work: float
    whole_work: float
    tile_forward: float  # largest no-grad tile: a step's input and output
    tile_backward: float  # largest tile's backward (see pass_peaks)
    tile_saved: float  # saved values of the largest tile, held when its graph is kept
    whole_saved: float
    whole_backward: float
    output_map: float


def _stage_pass(graph: TrunkGraph, plan: TilePlan, costs: list[LayerCost]) -> _StagePass:
    spatial = [i for i, s in enumerate(graph.steps) if s.spatial]
    full = plan.layer_sizes
    macs = [costs[i].macs_per_pixel for i in spatial]
    rows = _exact_lengths(graph, plan.row_spans, 0, full, spatial)
    cols = _exact_lengths(graph, plan.col_spans, 1, full, spatial)
    # Work is separable over rows and columns; the peaks need each distinct tile shape once.
    row_sums = [sum(r[k] for r in rows) for k in range(len(spatial))]
    col_sums = [sum(c[k] for c in cols) for k in range(len(spatial))]
    tile_work = sum(m * r * c for m, r, c in zip(macs, row_sums, col_sums))
    forward = backward = saved_peak = 0.0
    for r in set(rows):
        for c in set(cols):
            areas = dict(zip(spatial, (a * b for a, b in zip(r, c))))
            tile = pass_peaks(graph, costs, areas)
            forward, backward, saved_peak = max(forward, tile[0]), max(backward, tile[1]), max(saved_peak, tile[2])
    areas = {i: full[i][0] * full[i][1] for i in spatial}
    _, whole_backward, whole_saved = pass_peaks(graph, costs, areas)
    output = costs[graph.output].elements_per_pixel * plan.output_size[0] * plan.output_size[1]
    return _StagePass(
        tiles=len(plan), tile_work=tile_work, whole_work=sum(m * areas[i] for m, i in zip(macs, spatial)),
        tile_forward=forward, tile_backward=backward, tile_saved=saved_peak, whole_saved=whole_saved,
        whole_backward=whole_backward, output_map=output)


def pass_peaks(graph: TrunkGraph, costs: list[LayerCost], areas: dict[int, int]
               ) -> tuple[float, float, float]:
    """Forward peak, backward peak and saved values of one pass with the given step areas.

    The backward runs the steps in reverse: when step ``i`` runs, the values saved by the steps
    up to ``i`` are still held, plus the gradients of its output and of its input.
    """
    held = forward = backward = 0.0
    for index, area in areas.items():
        out = costs[index].elements_per_pixel * area
        inputs = max((costs[j].elements_per_pixel * areas.get(j, 0) for j in graph.steps[index].inputs), default=0)
        held += costs[index].saved_per_pixel * area
        forward = max(forward, out + inputs)
        backward = max(backward, held + out + inputs)
    return forward, backward, held


def estimate_step(stages: list[tuple[TrunkGraph, TilePlan, list[LayerCost]]], batch_size: int = 1,
                  bytes_per_value: int = 4) -> StepEstimate:
    """Predict time ratio and memory of a streamed step (see :class:`StepEstimate`).

    ``stages`` lists, per streamed stage, its graph, tile plan and layer costs; a trunk
    streamed in one piece is a single stage.
    """
    passes = [_stage_pass(graph, plan, costs) for graph, plan, costs in stages]
    maps = [p.output_map for p in passes]
    fmap = maps[-1]
    keeps_graph = [p.tiles == 1 for p in passes]
    held_graphs = [p.tile_saved if keep else 0.0 for p, keep in zip(passes, keeps_graph)]

    peak = 0.0
    for k, p in enumerate(passes):  # forward: maps so far, earlier kept graphs, this tile
        peak = max(peak, sum(maps[:k + 1]) + sum(held_graphs[:k]) + max(p.tile_forward, held_graphs[k]))
    for k in range(len(passes) - 1, -1, -1):  # backward, last stage first
        grads = (maps[k] if k < len(passes) - 1 else 0.0) + (maps[k - 1] if k > 0 else 0.0)
        held = sum(maps[:k]) + sum(held_graphs[:k]) + 2 * fmap + grads
        peak = max(peak, held + passes[k].tile_backward)

    params = sum(p.numel() for g, _, _ in stages for p in g.trunk.parameters()) * bytes_per_value
    whole_work = sum(p.whole_work for p in passes)
    work = sum(p.tile_work for p in passes)
    time = sum(p.tile_work * (3 if keep else 4) for p, keep in zip(passes, keeps_graph))
    whole = fmap + max(sum(p.whole_saved for p in passes[:k]) + passes[k].whole_backward
                       for k in range(len(passes)))
    return StepEstimate(
        tiles=sum(p.tiles for p in passes),
        recompute_factor=work / max(1, whole_work),
        relative_time=time / max(1, 3 * whole_work),
        peak_bytes=int(batch_size * peak * bytes_per_value + 2 * params),
        whole_image_bytes=int(batch_size * whole * bytes_per_value + params),
        feature_map_bytes=int(batch_size * fmap * bytes_per_value),
        stage_map_bytes=int(batch_size * sum(maps[:-1]) * bytes_per_value))


def _exact_lengths(graph: TrunkGraph, spans: tuple, axis: int, full: list[tuple[int, int]],
                   spatial: list[int]) -> list[tuple[int, ...]]:
    """Per tile along one axis: the exact length computed at each spatial step."""
    out = []
    for span, _ in spans:
        exact = graph.exact_spans(span, axis, full)
        out.append(tuple(max(0, exact[i][1] - exact[i][0]) for i in spatial))
    return out
