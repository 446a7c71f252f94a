"""Batching tiles: tiles that run identical operations are stacked on the batch axis and run once.

:meth:`~lightstream.core.graph.TrunkGraph.run` reads a tile's position only through the
differences of :class:`~lightstream.core.graph.AxisSchedule` (narrow offsets and lengths, pads,
merge crops). Two tiles whose schedules have the same :attr:`~AxisSchedule.shape_key` on both axes,
and whose owned outputs sit at the same offset in what they compute, therefore run the same
operations on tensors of the same shapes. Every op the trunk may contain treats the samples of the
batch axis independently (eval normalisation, convolutions, pooling, pointwise ops), so running
the stacked tiles once gives every tile's values exactly; :func:`batch_unsafe_reason` refuses
the few traced graphs that could mix the batch axis (a permutation or concatenation that moves
or extends it, a constant with its own batch extent). Tiles are grouped per axis: interior
tiles translated by a multiple of the output stride fall into one class, border tiles into
their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .geometry import Tile, TilePlan
from .graph import Span, TrunkGraph

__all__ = ["TileBatch", "batch_tiles", "batch_unsafe_reason", "single_tiles"]

_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)


@dataclass(frozen=True)
class TileBatch:
    """Tiles that run as one batch; ``lead`` is the tile whose coordinates the run uses."""

    tiles: tuple[Tile, ...]

    @property
    def lead(self) -> Tile:
        return self.tiles[0]

    def __len__(self) -> int:
        return len(self.tiles)


def single_tiles(plan: TilePlan) -> tuple[TileBatch, ...]:
    """Every tile on its own (no batching)."""
    return tuple(TileBatch((tile,)) for tile in plan.tiles)


def batch_tiles(graph: TrunkGraph, plan: TilePlan, limit: int) -> tuple[TileBatch, ...]:
    """The tiles of ``plan`` in batches of at most ``limit`` tiles that run identical operations."""
    if limit <= 1 or len(plan) == 1 or batch_unsafe_reason(graph) is not None:
        return single_tiles(plan)
    rows = [_axis_key(graph, spans, 0, plan) for spans in plan.row_spans]
    cols = [_axis_key(graph, spans, 1, plan) for spans in plan.col_spans]
    groups: dict[tuple, list[Tile]] = {}
    for tile in plan.tiles:
        groups.setdefault((rows[tile.index[0]], cols[tile.index[1]]), []).append(tile)
    return tuple(TileBatch(tuple(tiles[start:start + limit]))
                 for tiles in groups.values() for start in range(0, len(tiles), limit))


def _axis_key(graph: TrunkGraph, spans: tuple[Span, Span], axis: int, plan: TilePlan) -> tuple:
    """What one tile row (or column) runs, independent of where it is: its schedule's key and
    where its owned outputs sit in what it computes."""
    read, owned = spans
    schedule = graph.schedule(read, axis, plan.layer_sizes)
    held = schedule.held[graph.output]
    return schedule.shape_key, owned[0] - held[0], owned[1] - owned[0]


def batch_unsafe_reason(graph: TrunkGraph) -> str | None:
    """Why stacking tiles on the batch axis could mix them in ``graph``; ``None`` when it cannot."""
    for step in graph.steps:
        if not step.spatial or step.window is not None or not step.inputs:
            continue
        if step.family == "layout" and _moves_batch_axis(step.node):
            return f"{step.path} moves the batch axis"
        if step.target in _CONCATENATIONS and _argument(step.node, 1, "dim", 0) % 4 == 0:
            return f"{step.path} concatenates along the batch axis"
        for value in _static_operands(graph, step.node):
            if isinstance(value, torch.Tensor) and value.dim() >= 4 and value.shape[-4] != 1:
                return f"{step.path} broadcasts a constant with its own batch extent"
    return None


def _moves_batch_axis(node: fx.Node) -> bool:
    """Whether a permute/transpose node's output axis 0 is not its input axis 0 (or is unknown)."""
    ints = [a for a in node.args[1:] if isinstance(a, int)]
    nested = [a for a in node.args[1:] if isinstance(a, (tuple, list))]
    dims = list(nested[0]) if nested else ints or list(node.kwargs.get("dims", ()))
    if not dims:
        dims = [node.kwargs[k] for k in ("dim0", "dim1") if k in node.kwargs]
    if not dims or not all(isinstance(d, int) for d in dims):
        return True
    if len(dims) == 2:  # transpose(dim0, dim1); a permutation of a 4-d map names 4 axes
        return 0 in (dims[0] % 4, dims[1] % 4)
    return dims[0] % 4 != 0


def _argument(node: fx.Node, position: int, name: str, default: Any) -> Any:
    value = node.args[position] if len(node.args) > position else node.kwargs.get(name, default)
    return value if isinstance(value, int) else 0  # unknown: assume the batch axis


def _static_operands(graph: TrunkGraph, node: fx.Node) -> list[Any]:
    """The image-independent tensors a position-wise node reads (as evaluated at trace time)."""
    found: list[Any] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(graph.static_value(n)))
    return [v for v in found if v is not None]
