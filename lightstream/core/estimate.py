"""Predicted memory and time of a streamed training step, from the geometry alone.

Nothing here runs the network on real data: channel counts come from one shape-only pass
(``FakeTensorMode``), areas from the tile plan. The benchmark prints these predictions next to
measurements so they stay honest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .geometry import TilePlan
from .graph import TrunkGraph

__all__ = ["StepEstimate", "LayerCost", "layer_costs", "estimate_step"]


@dataclass(frozen=True)
class LayerCost:
    """Per spatial step: values stored per pixel and multiply-adds per pixel."""

    elements_per_pixel: int
    macs_per_pixel: int


@dataclass(frozen=True)
class StepEstimate:
    """Prediction for one training step (forward + backward) on one batch.

    Attributes:
        tiles: number of tiles.
        recompute_factor: streamed compute of one pass over whole-image compute (1.0 = no overlap).
        relative_time: streamed step time over the whole-image step time, taking the backward
            recomputation into account (``4/3 * recompute_factor``).
        peak_bytes: streamed step: the largest tile's autograd graph, the stitched feature map
            and its gradient, and the parameter gradients.
        whole_image_bytes: the conventional step: every activation of the whole image.
        feature_map_bytes: the stitched feature map alone.
    """

    tiles: int
    recompute_factor: float
    relative_time: float
    peak_bytes: int
    whole_image_bytes: int
    feature_map_bytes: int


def layer_costs(graph: TrunkGraph, in_channels: int, probe: int = 64) -> list[LayerCost]:
    """Per step of ``graph``: stored values and multiply-adds per output pixel (shape-only pass)."""
    macs: dict[int, int] = {}
    for index, step in enumerate(graph.steps):
        module = step.target if isinstance(step.target, nn.Module) else None
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(weight, torch.Tensor):
            macs[index] = weight.numel()
    elements: dict[int, int] = {}

    def observe(index: int, value: torch.Tensor) -> None:
        h, w = (value.shape[d] for d in graph.steps[index].dims)
        elements[index] = value.numel() // max(1, h * w * value.shape[0])

    size = max(probe, *graph_min_size(graph))
    dtype = next((p.dtype for p in graph.trunk.parameters() if p.is_floating_point()), torch.get_default_dtype())
    autocast_off = [torch.autocast(kind, enabled=False) for kind in ("cpu", "cuda")
                    if torch.is_autocast_enabled(kind)]  # shapes only: no casts, no data
    with FakeTensorMode(allow_non_fake_inputs=True), contextlib.ExitStack() as stack:
        for context in autocast_off:
            stack.enter_context(context)
        tile = torch.empty(1, in_channels, size, size, dtype=dtype)
        graph.run(tile, (0, size), (0, size), graph.sizes(size, size), observe)
    return [LayerCost(elements.get(i, 0), macs.get(i, elements.get(i, 0))) for i in range(len(graph.steps))]


def graph_min_size(graph: TrunkGraph) -> tuple[int, int]:
    """An image size large enough for every step to have a non-empty output."""
    size = 1
    while min(graph.sizes(size, size)[graph.output]) < 1:
        size *= 2
    return size, size


def estimate_step(stages: list[tuple[TrunkGraph, TilePlan, list[LayerCost]]], batch_size: int = 1,
                  bytes_per_value: int = 4) -> StepEstimate:
    """Predict time ratio and memory of a streamed step (see :class:`StepEstimate`).

    ``stages`` lists, per streamed stage, its graph, tile plan and layer costs; a trunk
    streamed in one piece is a single stage.
    """
    total_tile_work = total_whole_work = 0
    tile_peak = whole_values = kept_maps = 0
    for index, (graph, plan, costs) in enumerate(stages):
        spatial = [i for i, s in enumerate(graph.steps) if s.spatial]
        full = plan.layer_sizes
        macs = [costs[i].macs_per_pixel for i in spatial]
        values = [costs[i].elements_per_pixel for i in spatial]

        rows = _exact_lengths(graph, plan.row_spans, 0, full, spatial)
        cols = _exact_lengths(graph, plan.col_spans, 1, full, spatial)
        # Work is separable over rows and columns; the peak needs each distinct tile shape once.
        row_sums = [sum(r[k] for r in rows) for k in range(len(spatial))]
        col_sums = [sum(c[k] for c in cols) for k in range(len(spatial))]
        total_tile_work += sum(m * r * c for m, r, c in zip(macs, row_sums, col_sums))
        for r in set(rows):
            for c in set(cols):
                tile_peak = max(tile_peak, sum(v * a * b for v, a, b in zip(values, r, c)))
        whole_areas = [full[i][0] * full[i][1] for i in spatial]
        total_whole_work += sum(m * a for m, a in zip(macs, whole_areas))
        whole_values += sum(v * a for v, a in zip(values, whole_areas))
        out_values = costs[graph.output].elements_per_pixel * plan.output_size[0] * plan.output_size[1]
        if index < len(stages) - 1:
            kept_maps += 2 * out_values  # the kept stage map and, in the backward, its gradient
    factor = total_tile_work / max(1, total_whole_work)
    fmap = batch_size * out_values * bytes_per_value
    params = sum(p.numel() for g, _, _ in stages for p in g.trunk.parameters()) * bytes_per_value
    whole = batch_size * whole_values * bytes_per_value + 2 * params
    peak = batch_size * (tile_peak + kept_maps) * bytes_per_value + 2 * fmap + 3 * params
    return StepEstimate(sum(len(p) for _, p, _ in stages), factor, 4.0 / 3.0 * factor, peak, whole, fmap)


def _exact_lengths(graph: TrunkGraph, spans: tuple, axis: int, full: list[tuple[int, int]],
                   spatial: list[int]) -> list[tuple[int, ...]]:
    """Per tile along one axis: the exact length computed at each spatial step."""
    out = []
    for span, _ in spans:
        exact = graph.exact_spans(span, axis, full)
        out.append(tuple(max(0, exact[i][1] - exact[i][0]) for i in spatial))
    return out
