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

The time model, relative to the whole-image step: multiply-adds (a streamed stage runs its tiles
twice, forward and again with the backward: 4 units of work to the whole image's 3, the forward's
unit over its own, larger tiles where it has them; a stage of one tile keeps its graph and runs
once), plus what :class:`TimeModel` charges for *fresh memory*:
on a CPU with glibc's allocator every tensor of 32 MiB or more is mapped afresh by the operating
system on each allocation (page faults, zeroed pages), so a whole image, whose activations are all
that large, pays for each of them, and 1024-px tiles hardly at all. A pass allocates each step's
output (in the forward, unless the step writes in place) and its gradient (in the backward), and
the CPU's convolutions copy their input and output besides (:attr:`TimeModel.convolution_copies`).
The CPU executor also returns
the heap's free pages after every stage, and after every run of a stage whose runs hold at least
:data:`~lightstream.core.memory.RUN_TRIM_BYTES` (:func:`~lightstream.core.memory.release_host_memory`),
so each stage's first forward and backward run, and then every such run, faults its working set
in afresh; such a stage also maps its tensors of at least
:data:`~lightstream.core.memory.RUN_MMAP_THRESHOLD` afresh on every allocation (measured: not its
convolutions' copies). A GPU's caching
allocator keeps its memory, so there only the multiply-adds count.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .geometry import TilePlan
from .graph import TrunkGraph, module_device, parameter_dtype
from .memory import GLIBC_MMAP_THRESHOLD_MAX, RUN_MMAP_THRESHOLD, RUN_TRIM_BYTES

__all__ = ["StepEstimate", "LayerCost", "TimeModel", "layer_costs", "estimate_step", "pass_peaks", "pass_time"]

CPU_FRESH_MEMORY_COST = 25.0
CPU_CONVOLUTION_COPIES = 1


@dataclass(frozen=True)
class LayerCost:
    """Per output pixel of one step: values it outputs, values autograd saves, multiply-adds.

    ``in_place``: the step writes its output into its input's memory (an ``inplace=True``
    activation), so its forward allocates nothing. ``convolution``: the step is a convolution
    (a backend may copy its input and output, see :attr:`TimeModel.convolution_copies`).
    """

    elements_per_pixel: int
    macs_per_pixel: int
    saved_per_pixel: float = 0.0
    in_place: bool = False
    convolution: bool = False


@dataclass(frozen=True)
class TimeModel:
    """What a training step's time is made of besides multiply-adds, in multiply-adds.

    Attributes:
        fresh_memory_cost: multiply-adds' worth of time per byte of fresh memory: an allocation
            the operating system maps, faults in and zeroes page by page because the allocator
            did not keep it. 0 counts multiply-adds only.
        fresh_memory_threshold: allocations of at least this many bytes are fresh every time
            (glibc maps them with ``mmap`` and unmaps them on ``free``).
        run_trim_bytes: the executor returns the heap's free pages after every stage and after
            every run of at least this many bytes, so those runs' working sets are fresh memory
            again; ``None``: the allocator keeps its memory.
        run_mmap_threshold: in the stages of such runs, allocations of at least this many bytes
            are fresh every time.
        convolution_copies: copies of its input and of its output that a convolution allocates
            besides its result, in the forward (once this many each) and the backward (twice this
            many each): the CPU's oneDNN reorders plain tensors into its blocked layout and back.
    """

    fresh_memory_cost: float = 0.0
    fresh_memory_threshold: int = GLIBC_MMAP_THRESHOLD_MAX
    run_trim_bytes: int | None = None
    run_mmap_threshold: int = RUN_MMAP_THRESHOLD
    convolution_copies: int = 0

    @classmethod
    def for_device(cls, device: torch.device) -> TimeModel:
        """The model for where the trunk runs.

        On the CPU, fresh memory costs 25 multiply-adds a byte, measured on this project's
        2-core machine (ResNet-18 at 2048², torch 2.14): 0.41 s of kernel time per GiB of
        minor page faults against 66 G multiply-adds per CPU-second, and a convolution copies
        its input and output once in the forward and twice in the backward (oneDNN's layout
        reorders: the whole image's step faults in 7.1-7.4 GiB, 6.9 GiB by this count).
        Elsewhere (CUDA's caching allocator keeps its memory) only multiply-adds count, which
        leaves out per-tile overheads (kernel launches, crops and copies): on a GPU the
        estimate is optimistic.
        """
        if device.type == "cpu":
            return cls(fresh_memory_cost=CPU_FRESH_MEMORY_COST, run_trim_bytes=RUN_TRIM_BYTES,
                       convolution_copies=CPU_CONVOLUTION_COPIES)
        return cls()


@dataclass(frozen=True)
class StepEstimate:
    """Prediction for one training step (forward + backward) on one batch.

    Memory figures are what the step adds to the process that already holds the model, the
    image and the framework.

    Attributes:
        tiles: number of tiles (all stages).
        recompute_factor: streamed multiply-adds of one pass over the whole image's (1.0 = no
            overlap).
        relative_time: streamed step time over the whole-image step time, by the
            :class:`TimeModel` the estimate was made with (see the module docstring).
        peak_bytes: the streamed step's peak (see the module docstring).
        whole_image_bytes: the conventional step's peak (every saved value of the whole image).
        feature_map_bytes: the stitched feature map alone.
        stage_map_bytes: the kept stage maps (0 when the trunk streams in one piece).
        fresh_bytes: fresh memory the streamed step allocates (tensors past the time model's
            threshold, each time one is allocated, and the runs' working sets after the heap was
            returned).
        whole_image_fresh_bytes: the same for the conventional step.
    """

    tiles: int
    recompute_factor: float
    relative_time: float
    peak_bytes: int
    whole_image_bytes: int
    feature_map_bytes: int
    stage_map_bytes: int = 0
    fresh_bytes: int = 0
    whole_image_fresh_bytes: int = 0


def layer_costs(graph: TrunkGraph, in_channels: int, probe: int = 64) -> list[LayerCost]:
    """Per step of ``graph``: output, saved values and multiply-adds per output pixel.

    Runs the graph once on a fake (shape-only) tensor with gradients enabled and counts the
    distinct tensors autograd saves for the backward (parameters, buffers and the input
    excluded), attributing each to the step that saved it; a step whose output shares its
    input's memory is in place.
    """
    macs: dict[int, int] = {}
    convolutions: set[int] = set()
    for index, step in enumerate(graph.steps):
        module = step.target if isinstance(step.target, nn.Module) else None
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(weight, torch.Tensor):
            macs[index] = weight.numel()
        if isinstance(module, nn.Conv2d):
            convolutions.add(index)
    elements: dict[int, int] = {}
    saved: dict[int, float] = {}
    storages: dict[int, int] = {}  # each observed step's output memory
    in_place: set[int] = set()
    seen: set[int] = set()
    pending = [0]  # bytes saved since the last observed step

    size = max(probe, *graph_min_size(graph))
    dtype = parameter_dtype(graph.trunk)
    device = module_device(graph.trunk)  # the probe tile must be where the trunk is (fake tensors keep devices apart)
    itemsize = dtype.itemsize

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
        storages[index] = value.untyped_storage()._cdata
        if any(storages.get(j) == storages[index] for j in graph.steps[index].inputs):
            in_place.add(index)

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
    return [LayerCost(elements.get(i, 0), macs.get(i, elements.get(i, 0)), saved.get(i, 0.0), i in in_place,
                      i in convolutions) for i in range(len(graph.steps))]


def graph_min_size(graph: TrunkGraph) -> tuple[int, int]:
    """An image size large enough for every step to have a non-empty output."""
    size = 1
    while min(graph.sizes(size, size)[graph.output]) < 1:
        size *= 2
    return size, size


@dataclass(frozen=True)
class _StagePass:
    """One stage's numbers in values per image: work, tile peaks, map sizes and fresh memory."""

    tiles: int
    tile_work: float
    whole_work: float
    tile_forward: float  # largest no-grad tile: a step's input and output
    tile_backward: float  # largest tile's backward (see pass_peaks)
    tile_saved: float  # saved values of the largest tile, held when its graph is kept
    whole_saved: float
    whole_backward: float
    output_map: float
    tile_fresh: float  # fresh memory of a forward over all tiles (see _Allocations)
    tile_backward_fresh: float  # and of a backward
    whole_fresh: float
    whole_backward_fresh: float


@dataclass(frozen=True)
class _Allocations:
    """The tensors a pass allocates, as (step, values per pixel of that step's area) pairs: the
    forward's outputs (not those written in place) and convolutions' copies of their input and
    output; the backward's gradients (one of each step's output) and convolutions' copies."""

    forward: tuple[tuple[int, float], ...]
    backward: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, graph: TrunkGraph, costs: list[LayerCost], copies: int) -> _Allocations:
        forward, backward = [], []
        for index, step in enumerate(graph.steps):
            if not step.spatial or not step.inputs:
                continue
            out = float(costs[index].elements_per_pixel)
            if not costs[index].in_place:
                forward.append((index, out))
            backward.append((index, out))
            if costs[index].convolution:
                source = step.inputs[0]
                copy = [(source, float(costs[source].elements_per_pixel)), (index, out)]
                forward += copy * copies
                backward += copy * 2 * copies
        return cls(tuple(forward), tuple(backward))


def _stage_pass(graph: TrunkGraph, plan: TilePlan, costs: list[LayerCost], fresh_threshold: float,
                convolution_copies: int = 0) -> _StagePass:
    """``fresh_threshold``: the size (values per image) from which an allocation is fresh memory;
    ``convolution_copies``: see :attr:`TimeModel.convolution_copies`."""
    spatial = [i for i, s in enumerate(graph.steps) if s.spatial]
    full = plan.layer_sizes
    macs = [costs[i].macs_per_pixel for i in spatial]
    allocations = _Allocations.of(graph, costs, convolution_copies)
    rows = Counter(_held_lengths(graph, plan.row_spans, 0, full, spatial))
    cols = Counter(_held_lengths(graph, plan.col_spans, 1, full, spatial))
    # Work is separable over rows and columns; peaks and fresh memory need each tile shape once.
    row_sums = [sum(r[k] * n for r, n in rows.items()) for k in range(len(spatial))]
    col_sums = [sum(c[k] * n for c, n in cols.items()) for k in range(len(spatial))]
    tile_work = sum(m * r * c for m, r, c in zip(macs, row_sums, col_sums))
    forward = backward = saved_peak = tile_fresh = tile_backward_fresh = 0.0
    for r, row_count in rows.items():
        for c, col_count in cols.items():
            areas = dict(zip(spatial, (a * b for a, b in zip(r, c))))
            tile = pass_peaks(graph, costs, areas)
            forward, backward, saved_peak = max(forward, tile[0]), max(backward, tile[1]), max(saved_peak, tile[2])
            tile_fresh += row_count * col_count * _fresh(allocations.forward, areas, fresh_threshold)
            tile_backward_fresh += row_count * col_count * _fresh(allocations.backward, areas, fresh_threshold)
    areas = {i: full[i][0] * full[i][1] for i in spatial}
    _, whole_backward, whole_saved = pass_peaks(graph, costs, areas)
    output = costs[graph.output].elements_per_pixel * plan.output_size[0] * plan.output_size[1]
    return _StagePass(
        tiles=len(plan), tile_work=tile_work, whole_work=sum(m * areas[i] for m, i in zip(macs, spatial)),
        tile_forward=forward, tile_backward=backward, tile_saved=saved_peak, whole_saved=whole_saved,
        whole_backward=whole_backward, output_map=output, tile_fresh=tile_fresh,
        tile_backward_fresh=tile_backward_fresh, whole_fresh=_fresh(allocations.forward, areas, fresh_threshold),
        whole_backward_fresh=_fresh(allocations.backward, areas, fresh_threshold))


def pass_time(graph: TrunkGraph, plan: TilePlan, costs: list[LayerCost], time_model: TimeModel,
              bytes_per_value: int) -> float:
    """Time of one forward over ``plan``'s tiles in :class:`TimeModel` units: its multiply-adds
    plus what the model charges for the fresh memory of its outputs (``bytes_per_value``: bytes of
    one value of every image of the batch)."""
    stage = _stage_pass(graph, plan, costs, time_model.fresh_memory_threshold / bytes_per_value,
                        time_model.convolution_copies)
    return stage.tile_work + time_model.fresh_memory_cost * stage.tile_fresh * bytes_per_value


def _batched(stage: _StagePass, tiles: int) -> _StagePass:
    """A stage pass whose runs hold ``tiles`` tiles at once."""
    return replace(stage, tile_forward=tiles * stage.tile_forward, tile_backward=tiles * stage.tile_backward)


def _fresh_between(graph: TrunkGraph, plan: TilePlan, costs: list[LayerCost], low: float, high: float
                   ) -> tuple[float, float]:
    """Values a forward and a backward over ``plan`` allocate in tensors of ``low`` to ``high``
    values, convolutions' copies left out (measured on the CPU: a large run's copies are not
    faulted in again)."""
    lower, upper = (_stage_pass(graph, plan, costs, threshold) for threshold in (low, high))
    return lower.tile_fresh - upper.tile_fresh, lower.tile_backward_fresh - upper.tile_backward_fresh


def _fresh(allocations: Iterable[tuple[int, float]], areas: dict[int, int], threshold: float) -> float:
    """Values of the ``allocations`` (see :class:`_Allocations`) that are at least ``threshold`` values large."""
    return float(sum(v * areas.get(i, 0) for i, v in allocations if v * areas.get(i, 0) >= threshold))


def pass_peaks(graph: TrunkGraph, costs: list[LayerCost], areas: dict[int, int]
               ) -> tuple[float, float, float]:
    """Forward peak, backward peak and saved values of one pass with the given step areas.

    The forward without a graph holds, when step ``i`` runs, its output and every earlier output a
    later step still reads (a residual block's identity beside its branch). The backward runs the
    steps in reverse: when step ``i`` runs, the values saved by the steps up to ``i`` are still
    held, plus the gradients of its output and of its input.
    """
    last_read = {j: i for i in areas for j in graph.steps[i].inputs}
    live: dict[int, float] = {}
    held = forward = backward = 0.0
    for index, area in areas.items():
        out = costs[index].elements_per_pixel * area
        inputs = max((costs[j].elements_per_pixel * areas.get(j, 0) for j in graph.steps[index].inputs), default=0)
        held += costs[index].saved_per_pixel * area
        live[index] = out
        forward = max(forward, sum(live.values()))
        backward = max(backward, held + out + inputs)
        for j in graph.steps[index].inputs:
            if last_read.get(j) == index:
                live.pop(j, None)
        if index not in last_read and index != graph.output:  # read by no spatial step
            live.pop(index, None)
    return forward, backward, held


def estimate_step(stages: list[tuple[TrunkGraph, TilePlan, list[LayerCost]]], batch_size: int = 1,
                  bytes_per_value: int = 4, time_model: TimeModel | None = None,
                  tile_batches: list[int] | None = None, per_tile_loss: bool = False,
                  forward_plans: Sequence[tuple[TilePlan, int] | None] | None = None) -> StepEstimate:
    """Predict time ratio and memory of a streamed step (see :class:`StepEstimate`).

    ``stages`` lists, per streamed stage, its graph, tile plan and layer costs; a trunk
    streamed in one piece is a single stage. ``tile_batches``: per stage, the most tiles one
    run holds (default 1; a batch of ``k`` tiles holds ``k`` tiles' values). ``time_model`` defaults to multiply-adds only
    (``StreamingCNN.estimate`` passes its device's :meth:`TimeModel.for_device`).
    ``per_tile_loss``: a ``stream_loss`` step (one stage; each tile's backward follows its forward
    with the graph kept, and no output map is stitched). ``forward_plans``: per stage, the tile
    plan of its forward without a graph and the most tiles one of its runs holds, where they are
    not the stage's own (``StagePlan.forward_plan``); ``None`` for the others.
    """
    time_model = time_model or TimeModel()
    tile_batches = tile_batches or [1] * len(stages)
    forward_plans = forward_plans or [None] * len(stages)
    threshold = time_model.fresh_memory_threshold / (batch_size * bytes_per_value)
    copies = time_model.convolution_copies
    passes = [_batched(_stage_pass(graph, plan, costs, threshold, copies), k)
              for (graph, plan, costs), k in zip(stages, tile_batches)]
    forwards = [p if fwd is None else _batched(_stage_pass(graph, fwd[0], costs, threshold, copies), fwd[1])
                for (graph, _, costs), p, fwd in zip(stages, passes, forward_plans)]
    whole_output = passes[-1].output_map
    if per_tile_loss:
        if len(passes) != 1:
            raise ValueError("a per-tile loss streams the trunk in one piece: give one stage")
        passes = [replace(passes[0], output_map=0.0)]
    maps = [p.output_map for p in passes]
    fmap = maps[-1]
    keeps_graph = [p.tiles == 1 or per_tile_loss for p in passes]
    held_graphs = [p.tile_saved if keep else 0.0 for p, keep in zip(passes, keeps_graph)]

    peak = 0.0
    for k, p in enumerate(forwards):  # forward: maps so far, earlier kept graphs, this tile
        peak = max(peak, sum(maps[:k + 1]) + sum(held_graphs[:k]) + max(p.tile_forward, held_graphs[k]))
    for k in range(len(passes) - 1, -1, -1):  # backward, last stage first
        grads = (maps[k] if k < len(passes) - 1 else 0.0) + (maps[k - 1] if k > 0 else 0.0)
        held = sum(maps[:k]) + sum(held_graphs[:k]) + 2 * fmap + grads
        peak = max(peak, held + passes[k].tile_backward)

    # Fresh memory: a forward's allocations once per pass (a streamed stage's tiles run twice) and
    # the backward's once, each stitched map and its gradient; the whole image: one forward and
    # one backward.
    fresh = sum(p.tile_fresh + p.tile_backward_fresh + (0.0 if keep else f.tile_fresh)
                + (2 * p.output_map if p.output_map >= threshold else 0.0)
                for p, f, keep in zip(passes, forwards, keeps_graph))
    if time_model.run_trim_bytes is not None:  # each stage's first runs, and every large run, fault their memory in
        large_run = time_model.run_trim_bytes / (batch_size * bytes_per_value)
        mapped = time_model.run_mmap_threshold / (batch_size * bytes_per_value)
        for (graph, plan, costs), p, f, keep, k, fwd in zip(stages, passes, forwards, keeps_graph, tile_batches,
                                                           forward_plans):
            large = not keep and p.tile_backward >= large_run
            fresh += (p.tile_backward if keep else f.tile_forward) + (-(-p.tiles // k) if large else 1) * p.tile_backward
            if large:  # its tensors between the lower mmap threshold and the time model's are fresh every time
                forward, backward = _fresh_between(graph, plan, costs, mapped, threshold)
                fresh += forward + backward + (forward if fwd is None else
                                               _fresh_between(graph, fwd[0], costs, mapped, threshold)[0])
    fresh *= bytes_per_value
    whole_fresh = sum(p.whole_fresh + p.whole_backward_fresh for p in passes) * bytes_per_value
    params = sum(p.numel() for g, _, _ in stages for p in g.trunk.parameters()) * bytes_per_value
    whole_work = sum(p.whole_work for p in passes)
    work = sum(p.tile_work for p in passes)
    time = sum(3 * p.tile_work + (0.0 if keep else f.tile_work) for p, f, keep in zip(passes, forwards, keeps_graph))
    time += time_model.fresh_memory_cost * fresh
    whole_time = 3 * whole_work + time_model.fresh_memory_cost * whole_fresh
    whole = whole_output + max(sum(p.whole_saved for p in passes[:k]) + passes[k].whole_backward
                       for k in range(len(passes)))
    return StepEstimate(
        tiles=sum(p.tiles for p in passes),
        recompute_factor=work / max(1, whole_work),
        relative_time=time / max(1, whole_time),
        peak_bytes=int(batch_size * peak * bytes_per_value + 2 * params),
        whole_image_bytes=int(batch_size * whole * bytes_per_value + params),
        feature_map_bytes=int(batch_size * fmap * bytes_per_value),
        stage_map_bytes=int(batch_size * sum(maps[:-1]) * bytes_per_value),
        fresh_bytes=int(batch_size * fresh),
        whole_image_fresh_bytes=int(batch_size * whole_fresh))


def _held_lengths(graph: TrunkGraph, spans: tuple, axis: int, full: list[tuple[int, int]],
                   spatial: list[int]) -> list[tuple[int, ...]]:
    """Per tile along one axis: the length computed at each spatial step (exact values and margins)."""
    out = []
    for span, _ in spans:
        held = graph.schedule(span, axis, full).held
        out.append(tuple(max(0, held[i][1] - held[i][0]) for i in spatial))
    return out
