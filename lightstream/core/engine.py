"""The streaming engine: exact tiled forward and backward of a CNN trunk.

Forward: every tile of the :class:`~lightstream.core.geometry.TilePlan` runs the trunk without
an autograd graph and writes the feature-map pixels it owns into the stitched map.

Backward: every tile runs again, this time with a graph, and receives the slice of the output
gradient for the pixels it owns. A tile computes its pixels as exactly the same function of the
weights and the image as the whole-image network does (see :mod:`lightstream.core.graph`), and
the tiles' pixels partition the feature map, so the sum of the tiles' gradients *is* the
whole-image gradient: every weight-gradient contribution is counted exactly once, for every
parameter (convolutions, biases, normalisation affines, layer scales), at any batch size.
The gradient with respect to the image is the sum of the tiles' input gradients.

With stages (:mod:`lightstream.core.stages`) the same happens stage by stage: the forward keeps
each stage's stitched output, and the backward streams the stages in reverse, each producing
the exact gradient of its input map for the stage before it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import StreamingError, TileTooSmallError
from .estimate import StepEstimate, TimeModel, estimate_step
from .geometry import Geometry, Tile, TilePlan, as_pair
from .graph import TrunkGraph, crop_to, module_device, parameter_dtype
from .source import ImageSource, TensorSource, as_source
from .stages import (Stage, StagePlan, candidate_cuts, default_stage_memory, split_stages, stage_costs,
                     stage_tile_size, tile_values)

__all__ = ["StreamingCNN"]

logger = logging.getLogger(__name__)

_TRACES_KEPT = 4  # traced structures (module sets x train/eval modes) kept per engine


@dataclass(frozen=True)
class _Autocast:
    """The autocast state a forward ran under, replayed by the backward's recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> _Autocast:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


_TileGraph = tuple[Tile, torch.Tensor, torch.Tensor]
"""A single tile's live autograd graph: the tile, its input leaf and its output."""


@dataclass
class _Kept:
    """What the forward keeps for one stage's backward: its input map, or its whole graph."""

    input_map: torch.Tensor | None
    graph: _TileGraph | None


class StreamingCNN(nn.Module):
    """Run a convolutional trunk over images far larger than memory, tile by tile, exactly.

    Args:
        stream_module: the trunk: any ``nn.Module`` of local operations (convolutions, pooling,
            activations, eval-mode normalisation, residual additions, channel concatenation...)
            mapping ``[B, C, H, W]`` to ``[B, C', H', W']``. It is used as it is; gradients
            accumulate on its own parameters.
        tile_shape: the paper's tile shape ``(1, C, height, width)``; ``tile_size`` is the same.
        tile_size: tile height and width in image pixels (an int or ``(height, width)``). Memory
            of the backward scales with it; it must hold one receptive field of the (first
            stage of the) trunk.
        stages: ``"auto"`` (default) cuts an ``nn.Sequential`` trunk after its downsampling
            children, keeping the deepest stage maps that fit ``stage_memory`` (much less
            recompute, see :mod:`lightstream.core.stages`; other trunks stream in one piece);
            ``None`` streams the trunk as one piece (memory flat in image size); a list of
            child indices cuts there.
        stage_memory: bytes the kept stage maps and their gradients may use with ``"auto"``
            stages; ``"auto"`` (default): 1 GiB, or a sixteenth of the GPU's memory when the
            trunk is on a larger GPU (:func:`~lightstream.core.stages.default_stage_memory`).
        saliency: also compute the gradient with respect to the image in :meth:`backward`
            (stored in :attr:`saliency_map`).
        mean, std: optional per-channel normalisation applied to each tile on the device, so an
            image can stay ``uint8`` on the CPU (``(x - mean) / std``; non-float tiles are cast
            to the trunk's dtype first).
        progress: show a tqdm progress bar over tiles.

    Example::

        scnn = StreamingCNN(trunk, tile_size=1280)
        fmap = scnn(image)                 # no autograd graph is kept
        fmap.requires_grad_()
        loss = criterion(head(fmap), target)
        loss.backward()
        scnn.backward(image, fmap.grad)    # exact gradients into trunk's parameters

    Or let autograd drive the streamed backward (what :class:`~lightstream.StreamingModule` does)::

        loss = criterion(head(scnn.forward_autograd(image)), target)
        loss.backward()
    """

    def __init__(
        self,
        stream_module: nn.Module,
        tile_shape: Sequence[int] | None = None,
        *,
        tile_size: int | tuple[int, int] | None = None,
        stages: str | Sequence[int] | None = "auto",
        stage_memory: int | str = "auto",
        saliency: bool = False,
        mean: Sequence[float] | torch.Tensor | None = None,
        std: Sequence[float] | torch.Tensor | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if (tile_shape is None) == (tile_size is None):
            raise TypeError("give exactly one of tile_shape=(1, C, H, W) or tile_size=")
        if stages is not None and stages != "auto" and not isinstance(stream_module, nn.Sequential):
            raise TypeError("explicit stages need an nn.Sequential trunk (cuts are child indices)")
        if stage_memory != "auto" and not isinstance(stage_memory, int):
            raise TypeError(f"stage_memory must be a number of bytes or 'auto', not {stage_memory!r}")
        self.stream_module = stream_module
        self.tile_size = as_pair(tile_shape if tile_shape is not None else tile_size)  # type: ignore[arg-type]
        self.stages = stages if stages is None or stages == "auto" else tuple(int(c) for c in stages)
        self.stage_memory = stage_memory
        self.saliency = saliency
        self.saliency_map: torch.Tensor | None = None
        self.progress = progress
        self.register_buffer("mean", _channel_vector(mean), persistent=False)
        self.register_buffer("std", _channel_vector(std), persistent=False)
        self._traced: dict[tuple, tuple[Geometry, dict[tuple, Any]]] = {}
        self._kept: tuple[Any, int, list[_Kept]] | None = None
        self._normalisers: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._autocast: _Autocast | None = None
        first = self._stages(self._smallest_first_stage_cuts())[0]
        minimum = first.geometry.min_tile_size()
        if self.tile_size[0] < minimum[0] or self.tile_size[1] < minimum[1]:
            raise TileTooSmallError(self.tile_size, minimum)

    # ------------------------------------------------------------------ geometry
    def _structure_key(self) -> tuple:
        return tuple((name, id(m), m.training) for name, m in self.stream_module.named_modules())

    def _current(self) -> tuple[Geometry, dict[tuple, Any]]:
        """Geometry and plan cache of the trunk as it is now (modules and train/eval modes).

        A replaced module or a changed mode is traced anew (modes matter: a traced graph bakes
        in e.g. stochastic depth's ``training`` flag); the last few traces are kept, so
        switching between train and eval every epoch does not trace again.
        """
        key = self._structure_key()
        entry = self._traced.get(key)
        if entry is None:
            if self._traced:
                logger.debug("trunk modules or train/eval modes changed: tracing the trunk for them")
            if len(self._traced) >= _TRACES_KEPT:
                self._traced.pop(next(iter(self._traced)))
            entry = self._traced[key] = (Geometry(TrunkGraph(self.stream_module)), {})
        return entry

    @property
    def geometry(self) -> Geometry:
        """The whole trunk's exact geometry (receptive field, output stride, plans, profile)."""
        return self._current()[0]

    def _cached(self, key: tuple, build: Any) -> Any:
        cache = self._current()[1]
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _stages(self, cuts: tuple[int, ...]) -> list[Stage]:
        if not cuts:
            graph = self.geometry.graph
            return [Stage("trunk", self.stream_module, graph, self.geometry, (1, 1))]  # type: ignore[arg-type]
        return self._cached(("stages", cuts), lambda: split_stages(self.stream_module, cuts))

    def _stage_costs(self, stages: list[Stage], channels: int) -> list[list]:
        names = tuple(stage.name for stage in stages)
        return self._cached(("costs", names, channels), lambda: stage_costs(stages, channels))

    def _smallest_first_stage_cuts(self) -> tuple[int, ...]:
        if self.stages is None:
            return ()
        if self.stages == "auto":
            return tuple(self._cached(("candidates",), lambda: candidate_cuts(self.stream_module))[:1])
        return self.stages  # type: ignore[return-value]

    def stage_plans(self, image_shape: Sequence[int], dtype: torch.dtype | None = None) -> list[StagePlan]:
        """Per stage: its tile size and tile plan, for a ``(B, C, H, W)`` (or ``(H, W)``) image."""
        shape = tuple(int(v) for v in image_shape)
        batch, channels = (shape[0], shape[1]) if len(shape) == 4 else (1, _input_channels(self.stream_module))
        size = shape[-2:]
        itemsize = torch.empty(0, dtype=dtype or parameter_dtype(self.stream_module)).element_size()
        return self._cached(("plans", size, batch, channels, itemsize, self.tile_size, self.stages,
                             self.stage_memory_bytes),
                            lambda: self._make_stage_plans(size, batch, channels, itemsize))

    def _make_stage_plans(self, size: tuple[int, int], batch: int, channels: int, itemsize: int
                          ) -> list[StagePlan]:
        if self.stages is None:
            stage = self._stages(())[0]
            return [StagePlan(stage, self.tile_size, stage.geometry.plan(size, self.tile_size))]
        cuts = list(self.stages) if self.stages != "auto" else \
            self._auto_cuts(size, batch, channels, itemsize)
        stages = self._stages(tuple(cuts))
        costs = self._stage_costs(stages, channels)
        whole = self._stages(())[0]
        budget = tile_values(whole, self._stage_costs([whole], channels)[0], self.tile_size)
        plans: list[StagePlan] = []
        map_size = size
        for index, (stage, stage_cost) in enumerate(zip(stages, costs)):
            # The first stage tiles the image with the user's tile; later stages get the largest
            # tile that needs no more memory than one unstaged tile of the user's size.
            tile = self.tile_size if index == 0 else stage_tile_size(stage, stage_cost, budget, map_size)
            plan = stage.geometry.plan(map_size, tile)
            plans.append(StagePlan(stage, tile, plan))
            map_size = plan.output_size
        logger.debug("stages %s with tiles %s", [p.stage.name for p in plans], [p.tile_size for p in plans])
        return plans

    def _auto_cuts(self, size: tuple[int, int], batch: int, channels: int, itemsize: int) -> list[int]:
        """Deepest candidate cuts whose kept maps (and gradients) fit ``stage_memory``."""
        candidates = self._cached(("candidates",), lambda: candidate_cuts(self.stream_module))
        if not candidates:
            return []
        stages = self._stages(tuple(candidates))
        costs = self._stage_costs(stages, channels)
        chosen: list[int] = []
        used = 0
        map_size = size
        kept_bytes = []
        for stage, stage_cost in zip(stages[:-1], costs[:-1]):
            map_size = stage.geometry.output_size(map_size)
            per_pixel = stage_cost[stage.graph.output].elements_per_pixel
            kept_bytes.append(2 * batch * per_pixel * map_size[0] * map_size[1] * itemsize)
        for cut, need in reversed(list(zip(candidates, kept_bytes))):
            if used + need > self.stage_memory_bytes:
                break
            chosen.insert(0, cut)
            used += need
        first_field = self._stages(tuple(chosen))[0].geometry.receptive_field if chosen else \
            self.geometry.receptive_field
        while first_field[0] > self.tile_size[0] or first_field[1] > self.tile_size[1]:
            shallower = [c for c in candidates if not chosen or c < chosen[0]]
            if not shallower:
                break
            chosen.insert(0, shallower[-1])
            logger.warning("stage maps exceed stage_memory: cutting at child %d anyway, because the "
                           "tile %s is smaller than the first stage's receptive field", chosen[0],
                           self.tile_size)
            first_field = self._stages(tuple(chosen))[0].geometry.receptive_field
        return chosen

    def plan(self, image_size: Sequence[int]) -> TilePlan:
        """The tiles over the image (the first stage's plan) for ``(H, W)`` or ``(B, C, H, W)``."""
        return self.stage_plans(image_size)[0].plan

    def estimate(self, image_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 time_model: TimeModel | None = None) -> StepEstimate:
        """Predicted time ratio and memory of a training step on a ``(B, C, H, W)`` batch.

        Computed from the geometry (no real data is run), so a tile-size slider can call it.
        ``time_model`` defaults to the one for the trunk's device (:meth:`TimeModel.for_device`).
        """
        shape = tuple(int(v) for v in image_shape)
        plans = self.stage_plans(shape, dtype)
        costs = self._stage_costs([p.stage for p in plans], shape[1])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return estimate_step([(p.stage.graph, p.plan, c) for p, c in zip(plans, costs)], shape[0], itemsize,
                             time_model or TimeModel.for_device(self.device))

    @property
    def output_stride(self) -> tuple[int, int]:
        """Image pixels per feature-map pixel, per axis."""
        return self.geometry.output_stride

    @property
    def stage_memory_bytes(self) -> int:
        """``stage_memory`` in bytes (``"auto"`` resolved for the trunk's device)."""
        return default_stage_memory(self.device) if self.stage_memory == "auto" else self.stage_memory  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where the trunk's parameters live; tiles are moved there one at a time."""
        return module_device(self.stream_module)

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Stream the trunk over ``image`` (``[B, C, H, W]`` tensor or lazy source).

        Returns the stitched feature map, detached from autograd; the image may stay on the CPU.
        With stages, the stage maps a later :meth:`backward` needs are kept while gradients
        are enabled.
        """
        self._autocast = _Autocast.current(self.device)
        keep = torch.is_grad_enabled()
        with torch.no_grad():
            out, kept = self._forward_stages(as_source(image), keep, self.saliency)
        self._kept = (image, _version(image), kept) if keep else None
        return out

    def forward_autograd(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Like :meth:`forward`, but the result is part of the autograd graph.

        ``loss.backward()`` then runs the streamed backward by itself and delivers the trunk's
        gradients through autograd (so DDP, gradient accumulation and hooks see them as usual),
        and the image gradient if ``image`` requires grad.
        """
        source = as_source(image)
        tensor = image if isinstance(image, torch.Tensor) else None
        params = [p for p in self.stream_module.parameters() if p.requires_grad]
        return _StreamedTrunk.apply(self, source, tensor, *params)

    def _forward_stages(self, source: ImageSource, keep: bool, want_image_grad: bool = False
                        ) -> tuple[torch.Tensor, list[_Kept]]:
        """Stream every stage; with ``keep``, also return what each stage's backward needs."""
        kept: list[_Kept] = []
        for index, stage_plan in enumerate(self.stage_plans(source.shape)):
            input_map = source.image if keep and index > 0 else None  # type: ignore[attr-defined]
            graph_wanted = keep and len(stage_plan.plan) == 1 and (index > 0 or want_image_grad or any(
                p.requires_grad for p in stage_plan.stage.module.parameters()))
            out, graph = self._forward_tiles(stage_plan, source, index == 0, graph_wanted)
            kept.append(_Kept(input_map, graph))
            source = TensorSource(out)
        return out, kept

    def _forward_tiles(self, stage_plan: StagePlan, source: ImageSource, first: bool, keep_graph: bool
                       ) -> tuple[torch.Tensor, _TileGraph | None]:
        """Stream one stage. A single-tile stage can keep its graph (it fits the tile budget by
        construction), so its backward needs no recomputation: returns ``(tile, leaf, output)``."""
        graph, plan = stage_plan.stage.graph, stage_plan.plan
        if keep_graph:
            (tile, raw), = self._load_tiles(source, plan, "forward")
            with torch.enable_grad():
                leaf, x = self._prepare(raw, first, requires_grad=True)
                y = self._run_tile(graph, plan, tile, x)
            return y.detach(), (tile, leaf, y)
        out: torch.Tensor | None = None
        for tile, raw in self._load_tiles(source, plan, "forward"):
            y = self._run_tile(graph, plan, tile, self._prepare(raw, first)[1])
            if out is None:
                out = y.new_empty((y.shape[0], y.shape[1], *plan.output_size))
            out[:, :, tile.output.rows, tile.output.cols] = y
        assert out is not None
        return out, None

    def _run_tile(self, graph: TrunkGraph, plan: TilePlan, tile: Tile, x: torch.Tensor) -> torch.Tensor:
        box = tile.input
        y, rows, cols = graph.run(x, (box.top, box.bottom), (box.left, box.right), plan.layer_sizes)
        want = tile.output
        if rows[0] > want.top or rows[1] < want.bottom or cols[0] > want.left or cols[1] < want.right:
            raise StreamingError(f"internal error: tile {tile.index} computed rows {rows} cols {cols} "
                                 f"but owns {want}; please report this trunk")
        return crop_to(y, (rows, cols), ((want.top, want.bottom), (want.left, want.right)))

    def prepare_input(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` as the trunk's first layer sees it: on the trunk's device, cast to its dtype
        when it is an integer image, normalised by ``mean`` and ``std`` (as every tile is)."""
        return self._normalise(self._on_device(image))

    def _prepare(self, x: torch.Tensor, first: bool, requires_grad: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a raw tile to the device; for the image also cast and normalise it.

        Returns ``(leaf, prepared)``: the leaf is what the input gradient is taken against.
        """
        leaf = self._on_device(x)
        leaf = leaf.detach().requires_grad_() if requires_grad else leaf
        return leaf, self._normalise(leaf) if first else leaf

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x if x.is_floating_point() else x.to(parameter_dtype(self.stream_module))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised by ``mean`` and ``std``, which are copied to its device once: a copy
        from host memory per tile would make the CPU wait for the GPU at every tile."""
        key = (x.device, x.dtype)
        if key not in self._normalisers:
            self._normalisers[key] = tuple(  # type: ignore[assignment]
                v.to(x.device, x.dtype).view(1, -1, 1, 1) if v.numel() else None for v in (self.mean, self.std))
        mean, std = self._normalisers[key]
        x = x if mean is None else x - mean
        return x if std is None else x / std

    def _load_tiles(self, source: ImageSource, plan: TilePlan, what: str) -> Iterator[tuple[Tile, torch.Tensor]]:
        tiles = plan.tiles
        bar = tqdm(tiles, desc=f"streaming {what}", unit="tile", disable=not self.progress, leave=False)
        if isinstance(source, TensorSource):
            for tile in bar:
                yield tile, source.read(tile.input.rows, tile.input.cols)
            return
        # A lazy source (a slide on disk): read the next tile while this one computes.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(source.read, tiles[0].input.rows, tiles[0].input.cols)
            for index, tile in enumerate(bar):
                x = pending.result()
                if index + 1 < len(tiles):
                    nxt = tiles[index + 1].input
                    pending = pool.submit(source.read, nxt.rows, nxt.cols)
                yield tile, x

    # ------------------------------------------------------------------ backward
    def backward(self, image: torch.Tensor | ImageSource, grad: torch.Tensor) -> None:
        """Backpropagate ``grad`` (the gradient of the stitched feature map) through the trunk.

        Gradients accumulate into the trunk's parameters' ``.grad``, exactly as if the whole
        image had gone through the trunk. With ``saliency=True`` the image gradient is stored in
        :attr:`saliency_map`.
        """
        if grad is None:
            raise ValueError("grad is None: call fmap.requires_grad_() before the head's backward")
        params = [p for p in self.stream_module.parameters() if p.requires_grad]
        kept = None
        if self._kept is not None and self._kept[0] is image and self._kept[1] == _version(image):
            kept = self._kept[2]
        self._kept = None
        grads, image_grad = self._backward_stages(as_source(image), grad, kept, params, self.saliency,
                                                  self._autocast or _Autocast.current(self.device))
        for param, g in zip(params, grads):
            if g is not None:
                param.grad = g if param.grad is None else param.grad.add_(g)
        self.saliency_map = image_grad

    def input_gradient(self, image: torch.Tensor | ImageSource, grad: torch.Tensor) -> torch.Tensor:
        """The image gradient (saliency map) for feature-map gradient ``grad``.

        Parameter gradients are neither computed nor touched. The result has the image's full
        size (on the image's device; host memory for a lazy source).
        """
        kept = None
        if self._kept is not None and self._kept[0] is image and self._kept[1] == _version(image):
            kept, self._kept = self._kept[2], None
        autocast = self._autocast or _Autocast.current(self.device)
        image_grad = self._backward_stages(as_source(image), grad, kept, [], True, autocast)[1]
        assert image_grad is not None
        return image_grad

    def _backward_stages(self, source: ImageSource, grad: torch.Tensor, kept: list[_Kept] | None,
                         params: list[torch.Tensor], want_image_grad: bool, autocast: _Autocast
                         ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        plans = self.stage_plans(source.shape)
        if tuple(grad.shape[-2:]) != plans[-1].plan.output_size:
            raise ValueError(f"grad has spatial size {tuple(grad.shape[-2:])} but the feature map of "
                             f"this image is {plans[-1].plan.output_size}")
        if kept is None and len(plans) > 1:  # no (or stale) kept stage maps: recompute them
            logger.debug("recomputing %d stage maps for the backward", len(plans) - 1)
            with torch.no_grad(), autocast():
                kept = self._forward_stages(source, True, want_image_grad)[1]
        totals: dict[int, torch.Tensor] = {}
        for index in range(len(plans) - 1, -1, -1):
            state = kept[index] if kept is not None else _Kept(None, None)
            stage_params = [p for p in plans[index].stage.module.parameters() if p.requires_grad]
            want_input = index > 0 or want_image_grad
            if not stage_params and not want_input:
                continue
            stage_source = source if index == 0 else TensorSource(state.input_map)  # type: ignore[arg-type]
            if state.graph is not None:
                stage_grads, grad = self._backward_graph(state.graph, stage_source, grad, stage_params,
                                                         want_input)
            else:
                stage_grads, grad = self._backward_tiles(plans[index], stage_source, grad, stage_params,
                                                         want_input, autocast, first=index == 0)
            for param, g in zip(stage_params, stage_grads):
                if g is not None:
                    totals[id(param)] = g if id(param) not in totals else totals[id(param)].add_(g)
            if kept is not None:
                kept[index] = _Kept(None, None)  # free the stage's map or graph as soon as possible
        return [totals.get(id(p)) for p in params], grad if want_image_grad else None

    def _backward_graph(self, graph: _TileGraph, source: ImageSource, grad: torch.Tensor,
                        params: list[torch.Tensor], want_input_grad: bool
                        ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """Backward of a single-tile stage whose forward graph was kept."""
        tile, leaf, y = graph
        inputs = params + ([leaf] if want_input_grad else [])
        grads = torch.autograd.grad(y, inputs, grad.to(device=y.device, dtype=y.dtype), allow_unused=True)
        if not want_input_grad:
            return list(grads), None
        input_grad = _zeros_like_source(source, leaf.dtype)
        input_grad[:, :, tile.input.rows, tile.input.cols] = grads[-1]  # the tile may not read every pixel
        return list(grads[:-1]), input_grad

    def _backward_tiles(self, stage_plan: StagePlan, source: ImageSource, grad: torch.Tensor,
                        params: list[torch.Tensor], want_input_grad: bool, autocast: _Autocast, first: bool
                        ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        graph, plan = stage_plan.stage.graph, stage_plan.plan
        totals: list[torch.Tensor | None] = [None] * len(params)
        input_grad: torch.Tensor | None = None
        for tile, raw in self._load_tiles(source, plan, "backward"):
            with torch.enable_grad(), autocast():  # enable_grad: autograd's backward runs without it
                leaf, x = self._prepare(raw, first, requires_grad=want_input_grad)
                y = self._run_tile(graph, plan, tile, x)
            g = grad[:, :, tile.output.rows, tile.output.cols].to(device=y.device, dtype=y.dtype)
            inputs = params + ([leaf] if want_input_grad else [])
            tile_grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
            for index, tg in enumerate(tile_grads[:len(params)]):
                if tg is not None:
                    totals[index] = tg if totals[index] is None else totals[index].add_(tg)
            if want_input_grad:
                if input_grad is None:
                    input_grad = _zeros_like_source(source, leaf.dtype)
                input_grad[:, :, tile.input.rows, tile.input.cols] += tile_grads[-1].to(input_grad.device)
        return totals, input_grad


class _StreamedTrunk(torch.autograd.Function):
    """Autograd node of a streamed trunk: its backward is the streamed backward."""

    @staticmethod
    def forward(ctx: Any, engine: StreamingCNN, source: ImageSource, image: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.engine, ctx.source, ctx.params = engine, source, list(params)
        ctx.autocast = _Autocast.current(engine.device)
        engine._autocast = ctx.autocast
        with torch.no_grad():
            out, ctx.kept = engine._forward_stages(source, True, image is not None and image.requires_grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        want_image = bool(ctx.needs_input_grad[2])
        grads, image_grad = ctx.engine._backward_stages(ctx.source, grad, ctx.kept, ctx.params, want_image,
                                                        ctx.autocast)
        ctx.kept = None
        return (None, None, image_grad, *grads)


def _zeros_like_source(source: ImageSource, dtype: torch.dtype) -> torch.Tensor:
    """A zero gradient for the whole source, where it lives (a lazy source: host memory)."""
    device = source.image.device if isinstance(source, TensorSource) else torch.device("cpu")
    return torch.zeros(source.shape, dtype=dtype, device=device)


def _version(image: Any) -> int:
    return image._version if isinstance(image, torch.Tensor) else 0


def _channel_vector(values: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if values is None:
        return torch.empty(0)
    return torch.as_tensor(values, dtype=torch.float64 if isinstance(values, torch.Tensor)
                           and values.dtype == torch.float64 else torch.float32).flatten()


def _input_channels(trunk: nn.Module) -> int:
    """Channels the trunk's first convolution reads (3 when there is none to ask)."""
    return next((m.in_channels for m in trunk.modules() if isinstance(m, nn.Conv2d)), 3)
