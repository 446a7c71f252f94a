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
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import StreamingError, TileTooSmallError
from .estimate import LayerCost, StepEstimate, estimate_step, layer_costs
from .geometry import Geometry, Tile, TilePlan, as_pair
from .graph import TrunkGraph
from .source import ImageSource, TensorSource, as_source

__all__ = ["StreamingCNN"]

logger = logging.getLogger(__name__)


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


class StreamingCNN(nn.Module):
    """Run a convolutional trunk over images far larger than memory, tile by tile, exactly.

    Args:
        stream_module: the trunk: any ``nn.Module`` of local operations (convolutions, pooling,
            activations, eval-mode normalisation, residual additions, channel concatenation...)
            mapping ``[B, C, H, W]`` to ``[B, C', H', W']``. It is used as it is; gradients
            accumulate on its own parameters.
        tile_shape: the paper's tile shape ``(1, C, height, width)``; ``tile_size`` is the same.
        tile_size: tile height and width in image pixels (an int or ``(height, width)``). Memory
            of the backward scales with it; it must hold one receptive field of the trunk.
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
        saliency: bool = False,
        mean: Sequence[float] | torch.Tensor | None = None,
        std: Sequence[float] | torch.Tensor | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if (tile_shape is None) == (tile_size is None):
            raise TypeError("give exactly one of tile_shape=(1, C, H, W) or tile_size=")
        self.stream_module = stream_module
        self.tile_size = as_pair(tile_shape if tile_shape is not None else tile_size)  # type: ignore[arg-type]
        self.saliency = saliency
        self.saliency_map: torch.Tensor | None = None
        self.progress = progress
        self.register_buffer("mean", _channel_vector(mean), persistent=False)
        self.register_buffer("std", _channel_vector(std), persistent=False)
        self._traced: tuple[tuple, TrunkGraph, Geometry] | None = None
        self._plans: dict[tuple, TilePlan] = {}
        self._costs: dict[tuple, list[LayerCost]] = {}
        self._autocast: _Autocast | None = None
        minimum = self.geometry.min_tile_size()
        if self.tile_size[0] < minimum[0] or self.tile_size[1] < minimum[1]:
            raise TileTooSmallError(self.tile_size, minimum)

    # ------------------------------------------------------------------ geometry
    def _structure_key(self) -> tuple:
        return tuple((name, id(m), m.training) for name, m in self.stream_module.named_modules())

    def _graph(self) -> tuple[TrunkGraph, Geometry]:
        key = self._structure_key()
        if self._traced is None or self._traced[0] != key:
            if self._traced is not None:
                logger.info("trunk modules or train/eval modes changed: tracing the trunk again")
            graph = TrunkGraph(self.stream_module)
            self._traced = (key, graph, Geometry(graph))
            self._plans.clear()
        return self._traced[1], self._traced[2]

    @property
    def geometry(self) -> Geometry:
        """The trunk's exact tile geometry (receptive field, output stride, plans, profile)."""
        return self._graph()[1]

    def plan(self, image_size: Sequence[int]) -> TilePlan:
        """The tile plan for an image of ``(H, W)`` (or a full ``(B, C, H, W)`` shape)."""
        geometry = self.geometry
        size = as_pair(tuple(image_size))
        key = (geometry.fingerprint, size, self.tile_size)
        if key not in self._plans:
            plan = geometry.plan(size, self.tile_size)
            logger.debug("planned %d tiles (%dx%d) for a %dx%d image, recompute factor %.2f",
                         len(plan), *plan.grid, *size, plan.recompute_factor)
            self._plans[key] = plan
        return self._plans[key]

    def estimate(self, image_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> StepEstimate:
        """Predicted time ratio and memory of a training step on a ``(B, C, H, W)`` batch.

        Computed from the geometry (no real data is run), so a tile-size slider can call it.
        """
        batch, channels, height, width = (int(v) for v in image_shape)
        graph, geometry = self._graph()
        key = (geometry.fingerprint, channels)
        if key not in self._costs:
            self._costs[key] = layer_costs(graph, channels)
        plan = self.plan((height, width))
        return estimate_step(graph, plan, self._costs[key], batch, torch.empty(0, dtype=dtype).element_size())

    @property
    def output_stride(self) -> tuple[int, int]:
        """Image pixels per feature-map pixel, per axis."""
        return self.geometry.output_stride

    @property
    def device(self) -> torch.device:
        """Where the trunk's parameters live; tiles are moved there one at a time."""
        for tensor in itertools.chain(self.stream_module.parameters(), self.stream_module.buffers()):
            return tensor.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Stream the trunk over ``image`` (``[B, C, H, W]`` tensor or lazy source).

        Returns the stitched feature map, detached from autograd; the image may stay on the CPU.
        """
        self._autocast = _Autocast.current(self.device)
        with torch.no_grad():
            return self._forward_tiles(as_source(image))

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

    def _forward_tiles(self, source: ImageSource) -> torch.Tensor:
        graph, _ = self._graph()
        plan = self.plan(source.shape)
        out: torch.Tensor | None = None
        for tile, raw in self._load_tiles(source, plan, "forward"):
            y = self._run_tile(graph, plan, tile, self._prepare(raw)[1])
            if out is None:
                out = y.new_empty((y.shape[0], y.shape[1], *plan.output_size))
            out[:, :, tile.output.rows, tile.output.cols] = y
        assert out is not None
        return out

    def _run_tile(self, graph: TrunkGraph, plan: TilePlan, tile: Tile, x: torch.Tensor) -> torch.Tensor:
        box = tile.input
        y, rows, cols = graph.run(x, (box.top, box.bottom), (box.left, box.right), plan.layer_sizes)
        want = tile.output
        if rows[0] > want.top or rows[1] < want.bottom or cols[0] > want.left or cols[1] < want.right:
            raise StreamingError(f"internal error: tile {tile.index} computed rows {rows} cols {cols} "
                                 f"but owns {want}; please report this trunk")
        return y[:, :, want.top - rows[0]:want.bottom - rows[0], want.left - cols[0]:want.right - cols[0]]

    def _prepare(self, x: torch.Tensor, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a raw tile to the device, cast it, normalise it; returns (leaf, prepared)."""
        x = x.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            x = x.to(_parameter_dtype(self.stream_module))
        leaf = x.detach().requires_grad_() if requires_grad else x
        x = leaf
        if self.mean.numel():
            x = x - self.mean.to(x.dtype).view(1, -1, 1, 1)
        if self.std.numel():
            x = x / self.std.to(x.dtype).view(1, -1, 1, 1)
        return leaf, x

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
        grads, image_grad = self._backward_tiles(as_source(image), grad, params, self.saliency,
                                                 self._autocast or _Autocast.current(self.device))
        for param, g in zip(params, grads):
            if g is not None:
                param.grad = g if param.grad is None else param.grad.add_(g)
        self.saliency_map = image_grad

    def _backward_tiles(self, source: ImageSource, grad: torch.Tensor, params: list[torch.Tensor],
                        want_image_grad: bool, autocast: _Autocast
                        ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        graph, _ = self._graph()
        plan = self.plan(source.shape)
        if tuple(grad.shape[-2:]) != plan.output_size:
            raise ValueError(f"grad has spatial size {tuple(grad.shape[-2:])} but the feature map of "
                             f"this image is {plan.output_size}")
        totals: list[torch.Tensor | None] = [None] * len(params)
        image_grad: torch.Tensor | None = None
        if not params and not want_image_grad:
            return totals, image_grad
        for tile, raw in self._load_tiles(source, plan, "backward"):
            leaf, x = self._prepare(raw, requires_grad=want_image_grad)
            with torch.enable_grad(), autocast():
                y = self._run_tile(graph, plan, tile, x)
            g = grad[:, :, tile.output.rows, tile.output.cols].to(device=y.device, dtype=y.dtype)
            inputs = params + ([leaf] if want_image_grad else [])
            tile_grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
            for index, tg in enumerate(tile_grads[:len(params)]):
                if tg is not None:
                    totals[index] = tg if totals[index] is None else totals[index].add_(tg)
            if want_image_grad:
                if image_grad is None:
                    image_grad = torch.zeros(source.shape, dtype=leaf.dtype, device=leaf.device)
                image_grad[:, :, tile.input.rows, tile.input.cols] += tile_grads[-1]
        return totals, image_grad


class _StreamedTrunk(torch.autograd.Function):
    """Autograd node of a streamed trunk: its backward is the streamed backward."""

    @staticmethod
    def forward(ctx: Any, engine: StreamingCNN, source: ImageSource, image: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.engine, ctx.source, ctx.params = engine, source, list(params)
        ctx.autocast = _Autocast.current(engine.device)
        engine._autocast = ctx.autocast
        with torch.no_grad():
            return engine._forward_tiles(source)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        want_image = bool(ctx.needs_input_grad[2])
        grads, image_grad = ctx.engine._backward_tiles(ctx.source, grad, ctx.params, want_image,
                                                       ctx.autocast)
        return (None, None, image_grad, *grads)


def _channel_vector(values: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if values is None:
        return torch.empty(0)
    return torch.as_tensor(values, dtype=torch.float64 if isinstance(values, torch.Tensor)
                           and values.dtype == torch.float64 else torch.float32).flatten()


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()
