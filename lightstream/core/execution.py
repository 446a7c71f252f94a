"""Executing a :class:`~lightstream.core.planner.StreamPlan`: tiled forward and backward.

Forward: every tile of a stage's forward plan runs the stage without an autograd graph and writes
the feature-map pixels it owns into the stitched map, stage after stage. Such a run saves nothing
for a backward, so a stage's forward may run larger tiles than its backward in the same memory
(:attr:`~lightstream.core.stages.StagePlan.forward_plan`); a lazy image (a slide on disk) is still
read in the user's tiles.

Backward: every tile runs again, this time with a graph, and receives the slice of the output
gradient for the pixels it owns. A tile computes its pixels as exactly the same function of the
weights and the image as the whole-image network does (see :mod:`lightstream.core.graph`), and
the tiles' pixels partition the feature map, so the sum of the tiles' gradients *is* the
whole-image gradient: every weight-gradient contribution is counted exactly once, for every
parameter, at any batch size. The image gradient is the sum of the tiles' input gradients.
With stages, the backward streams them in reverse, each producing the exact gradient of its
input map for the stage before it. A stage of one tile keeps its graph from its forward (it fits
the tile budget by construction), so its backward needs no recomputation.

Tiles run in the batches of their :class:`~lightstream.core.stages.StagePlan`: the tiles of a
batch run the same operations (:mod:`lightstream.core.batching`), so they are stacked on the
batch axis, run once, and split again; the backward takes one ``torch.autograd.grad`` per batch
and adds its parameter gradients with one ``_foreach_add_``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .batching import TileBatch
from .errors import StreamingError
from .geometry import Tile
from .graph import crop_to
from .inputs import Autocast, TilePreparer
from .memory import RUN_MMAP_THRESHOLD, RUN_TRIM_BYTES, release_host_memory, tensors_mapped_from
from .planner import StreamPlan
from .source import ImageSource, TensorSource, region
from .stages import StagePlan

__all__ = ["Executor", "Kept", "TileGraph", "backpropagate"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class TileGraph:
    """A single tile's live autograd graph: the tile, its input leaf and its output."""

    tile: Tile
    leaf: torch.Tensor
    output: torch.Tensor


@dataclass
class Kept:
    """What the forward keeps for one stage's backward: its input map, or its whole graph."""

    input_map: torch.Tensor | None = None
    graph: TileGraph | None = None


Gradients = list[torch.Tensor | None]


class Executor:
    """Runs plans tile by tile; ``prepare`` moves, casts and normalises each raw tile."""

    def __init__(self, prepare: TilePreparer, progress: bool = False) -> None:
        self.prepare = prepare
        self.progress = progress

    # ------------------------------------------------------------------ forward
    def forward(self, plan: StreamPlan, source: ImageSource, keep: bool, want_image_grad: bool = False
                ) -> tuple[torch.Tensor, list[Kept]]:
        """Stream every stage; with ``keep``, also return what each stage's backward needs."""
        kept: list[Kept] = []
        out = torch.empty(0)
        for index, stage_plan in enumerate(plan.stages):
            input_map = source.image if keep and index > 0 else None  # type: ignore[attr-defined]
            keep_graph = keep and len(stage_plan.plan) == 1 and (index > 0 or want_image_grad or any(
                p.requires_grad for p in stage_plan.stage.module.parameters()))
            with self._host_allocation(stage_plan):
                out, graph = self._forward_stage(stage_plan, source, index == 0, keep_graph)
            kept.append(Kept(input_map, graph))
            source = TensorSource(out)
            self._stage_done()
        return out, kept

    def _forward_stage(self, stage_plan: StagePlan, source: ImageSource, first: bool, keep_graph: bool
                       ) -> tuple[torch.Tensor, TileGraph | None]:
        if keep_graph:
            (batch, raw), = self._load_batches(source, stage_plan.batches, "forward")
            with torch.enable_grad():
                leaf, x = self.prepare(raw, first, requires_grad=True)
                y = self._run_batch(stage_plan, batch, x)
            return y.detach(), TileGraph(batch.lead, leaf, y)
        out: torch.Tensor | None = None
        batches = stage_plan.forward_runs(isinstance(source, TensorSource))
        for batch, raw in self._load_batches(source, batches, "forward"):
            y = self._run_batch(stage_plan, batch, self.prepare(raw, first)[1])
            if out is None:
                out = y.new_empty((y.shape[0] // len(batch), y.shape[1], *stage_plan.plan.output_size))
            for tile, part in zip(batch.tiles, _per_tile(y, len(batch))):
                region(out, tile.output.rows, tile.output.cols).copy_(part)
        assert out is not None
        return out, None

    def _run_batch(self, stage_plan: StagePlan, batch: TileBatch, x: torch.Tensor) -> torch.Tensor:
        """Run the batch's stacked tiles once, with its lead tile's coordinates (all of them run
        the same operations, see :mod:`lightstream.core.batching`), cropped to what they own."""
        box, want = batch.lead.input, batch.lead.output
        out = stage_plan.stage.graph.run(x, (box.top, box.bottom), (box.left, box.right), stage_plan.plan.layer_sizes)
        rows, cols = out.exact
        if rows[0] > want.top or rows[1] < want.bottom or cols[0] > want.left or cols[1] < want.right:
            raise StreamingError(f"internal error: tile {batch.lead.index} computed rows {rows} cols {cols} "
                                 f"but owns {want}; please report this trunk")
        return crop_to(out.value, out.held, ((want.top, want.bottom), (want.left, want.right)))

    def _load_batches(self, source: ImageSource, batches: tuple[TileBatch, ...], what: str
                      ) -> Iterator[tuple[TileBatch, torch.Tensor]]:
        """Each batch with its tiles' pixels stacked on the batch axis; a lazy source (a slide on
        disk) reads the next batch while this one computes."""
        bar = tqdm(total=sum(len(b) for b in batches), desc=f"streaming {what}", unit="tile",
                   disable=not self.progress, leave=False)
        with bar:
            if isinstance(source, TensorSource):
                for batch in batches:
                    yield batch, _read_batch(source, batch)
                    bar.update(len(batch))
                return
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(_read_batch, source, batches[0])
                for index, batch in enumerate(batches):
                    x = pending.result()
                    if index + 1 < len(batches):
                        pending = pool.submit(_read_batch, source, batches[index + 1])
                    yield batch, x
                    bar.update(len(batch))

    # ------------------------------------------------------------------ backward
    def backward(self, plan: StreamPlan, source: ImageSource, grad: torch.Tensor, kept: list[Kept] | None,
                 params: list[torch.Tensor], want_image_grad: bool, autocast: Autocast
                 ) -> tuple[Gradients, torch.Tensor | None]:
        """Gradients of ``params`` (and of the image) for feature-map gradient ``grad``."""
        if kept is None and len(plan.stages) > 1:  # no kept stage maps: recompute them
            logger.debug("recomputing %d stage maps for the backward", len(plan.stages) - 1)
            with torch.no_grad(), autocast():
                kept = self.forward(plan, source, True, want_image_grad)[1]
        totals: dict[int, torch.Tensor] = {}
        for index in range(len(plan.stages) - 1, -1, -1):
            state = kept[index] if kept is not None else Kept()
            stage_plan = plan.stages[index]
            stage_params = [p for p in stage_plan.stage.module.parameters() if p.requires_grad]
            want_input = index > 0 or want_image_grad
            if not stage_params and not want_input:
                continue
            stage_source = source if index == 0 else TensorSource(state.input_map)  # type: ignore[arg-type]
            if state.graph is not None:
                stage_grads, grad = self._backward_graph(state.graph, stage_source, grad, stage_params, want_input)
            else:
                with self._host_allocation(stage_plan):
                    stage_grads, grad = self._backward_stage(stage_plan, stage_source, grad, stage_params,
                                                             want_input, autocast, first=index == 0)
            for param, g in zip(stage_params, stage_grads):
                if g is not None:
                    totals[id(param)] = g if id(param) not in totals else totals[id(param)].add_(g)
            if kept is not None:
                kept[index] = Kept()  # free the stage's map or graph as soon as possible
            self._stage_done()
        return [totals.get(id(p)) for p in params], grad if want_image_grad else None

    def _large_runs(self, stage_plan: StagePlan) -> bool:
        """Whether ``stage_plan`` streams on the CPU in runs of at least
        :data:`~lightstream.core.memory.RUN_TRIM_BYTES` (by the plan's cost model)."""
        return (self.prepare.device.type == "cpu" and len(stage_plan.plan) > 1
                and stage_plan.tile_bytes * stage_plan.tile_batch >= RUN_TRIM_BYTES)

    def _host_allocation(self, stage_plan: StagePlan) -> contextlib.AbstractContextManager[None]:
        """How a stage allocates host memory: large runs map their tensors of at least
        :data:`~lightstream.core.memory.RUN_MMAP_THRESHOLD` bytes apart and return them on free, so
        that no run leaves them in a heap the next one cannot reuse; others use the heap as is."""
        return tensors_mapped_from(RUN_MMAP_THRESHOLD) if self._large_runs(stage_plan) else contextlib.nullcontext()

    def _stage_done(self) -> None:
        """Between stages on the CPU, give the heap pages the stage's tiles freed back to the system:
        the next stage's tiles have other shapes and would leave them unused beside their own."""
        if self.prepare.device.type == "cpu":
            release_host_memory()

    def _backward_graph(self, graph: TileGraph, source: ImageSource, grad: torch.Tensor,
                        params: list[torch.Tensor], want_input_grad: bool) -> tuple[Gradients, torch.Tensor | None]:
        """Backward of a single-tile stage whose forward graph was kept."""
        inputs = params + ([graph.leaf] if want_input_grad else [])
        y = graph.output
        grads = torch.autograd.grad(y, inputs, grad.to(device=y.device, dtype=y.dtype), allow_unused=True)
        if not want_input_grad:
            return list(grads), None
        if isinstance(source, TensorSource) and grads[-1].shape == source.image.shape:  # the tile is the map
            return list(grads[:-1]), grads[-1].to(source.image.device)
        input_grad = _zeros_like_source(source, graph.leaf.dtype)
        region(input_grad, graph.tile.input.rows, graph.tile.input.cols).copy_(grads[-1])  # it may not read every pixel
        return list(grads[:-1]), input_grad

    def _backward_stage(self, stage_plan: StagePlan, source: ImageSource, grad: torch.Tensor,
                        params: list[torch.Tensor], want_input_grad: bool, autocast: Autocast, first: bool
                        ) -> tuple[Gradients, torch.Tensor | None]:
        totals: Gradients = [None] * len(params)
        input_grad: torch.Tensor | None = None
        # large runs fragment glibc's heap: what one leaves unusable would otherwise stay beside
        # the next run's, so each returns the heap's free pages (the next faults its own back in)
        trim_each_run = self._large_runs(stage_plan)
        for batch, raw in self._load_batches(source, stage_plan.batches, "backward"):
            with torch.enable_grad(), autocast():  # enable_grad: autograd's backward runs without it
                leaf, x = self.prepare(raw, first, requires_grad=want_input_grad)
                y = self._run_batch(stage_plan, batch, x)
            g = _stack([region(grad, t.output.rows, t.output.cols) for t in batch.tiles]).to(device=y.device,
                                                                                             dtype=y.dtype)
            input_grad = backpropagate(y, g, params, leaf if want_input_grad else None, batch, source, totals,
                                       input_grad)
            del y, g, leaf, x, raw
            if trim_each_run:
                release_host_memory()
        return totals, input_grad


def backpropagate(output: torch.Tensor, grad_output: torch.Tensor | None, params: list[torch.Tensor],
                  leaf: torch.Tensor | None, batch: TileBatch, source: ImageSource, totals: Gradients,
                  input_grad: torch.Tensor | None) -> torch.Tensor | None:
    """One ``autograd.grad`` through a tile batch's graph: the parameter gradients are added into
    ``totals``; with a ``leaf``, each tile's input gradient is added into ``input_grad`` (a zero
    gradient of the whole source, made on first use), which is returned."""
    inputs = params + ([leaf] if leaf is not None else [])
    grads = torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    _accumulate(totals, grads[:len(params)])
    if leaf is None:
        return input_grad
    if input_grad is None:
        input_grad = _zeros_like_source(source, leaf.dtype)
    for tile, part in zip(batch.tiles, _per_tile(grads[-1].to(input_grad.device), len(batch))):
        region(input_grad, tile.input.rows, tile.input.cols).add_(part)
    return input_grad


def _accumulate(totals: Gradients, grads: Sequence[torch.Tensor | None]) -> None:
    """Add ``grads`` into ``totals`` in place (the first ones are taken as they are), in one op."""
    into = [i for i, g in enumerate(grads) if g is not None and totals[i] is not None]
    if into:
        torch._foreach_add_([totals[i] for i in into], [grads[i] for i in into])  # type: ignore[misc]
    for index, g in enumerate(grads):
        if totals[index] is None:
            totals[index] = g


def _read_batch(source: ImageSource, batch: TileBatch) -> torch.Tensor:
    """The batch's tiles read from ``source``, stacked on the batch axis."""
    return _stack([source.read(tile.input.rows, tile.input.cols) for tile in batch.tiles])


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _per_tile(x: torch.Tensor, tiles: int) -> tuple[torch.Tensor, ...]:
    """A batch's result split back into its tiles' ``[B, ...]`` parts."""
    return (x,) if tiles == 1 else x.chunk(tiles)


def _zeros_like_source(source: ImageSource, dtype: torch.dtype) -> torch.Tensor:
    """A zero gradient for the whole source, where it lives (a lazy source: host memory)."""
    device = source.image.device if isinstance(source, TensorSource) else torch.device("cpu")
    return torch.zeros(source.shape, dtype=dtype, device=device)
