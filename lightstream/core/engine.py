"""The streaming engine: exact tiled forward and backward of a CNN trunk.

:class:`StreamingCNN` is the user-facing object of the pipeline *trunk → trace → plan →
execute*: its settings (tile size, stage policy, stage memory, normalisation) are validated when
given; a :class:`~lightstream.core.planner.TraceCache` traces the trunk (again whenever what a
trace bakes in changes); the :class:`~lightstream.core.planner.Planner` turns an image shape and
the settings into an immutable plan; the :class:`~lightstream.core.execution.Executor` runs it
(see :mod:`lightstream.core.execution` for why the result is exact). Each forward leaves a
:class:`~lightstream.core.record.ForwardRecord`, which its backward checks as autograd checks
its saved tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import checks
from .checks import (StagePolicy, channel_vector, input_channels, stage_memory_setting, stage_policy,
                     tile_batch_setting, tile_pair)
from .dense import REDUCTIONS, DenseStreamer, LossFunction, LossResult, PixelTarget, TileCallback
from .errors import TileTooSmallError
from .estimate import StepEstimate, TimeModel, estimate_step
from .execution import Executor
from .geometry import Geometry, TilePlan
from .graph import module_device, parameter_dtype
from .inputs import Autocast, Normaliser, NormaliserCache, TilePreparer
from .planner import Planner, PlanRequest, StreamPlan, TraceCache, spends_spare_memory
from .record import ForwardRecord, StaleForwardError
from .source import ImageSource, as_source
from .stages import StagePlan, default_stage_memory

__all__ = ["StreamingCNN"]

class StreamingCNN(nn.Module):
    """Run a convolutional trunk over images far larger than memory, tile by tile, exactly.

    Args:
        stream_module: the trunk: any ``nn.Module`` of local operations (convolutions, pooling,
            activations, eval-mode normalisation, residual additions, channel concatenation...)
            mapping ``[B, C, H, W]`` to ``[B, C', H', W']``. It is used as it is; gradients
            accumulate on its own parameters.
        tile_shape: the paper's tile shape ``(1, C, height, width)``; ``tile_size`` is the same.
        tile_size: tile height and width in image pixels (a positive int or ``(height, width)``).
            Memory of the backward scales with it; it must hold one receptive field of the
            (first stage of the) trunk. Setting :attr:`tile_size` later re-plans.
        stages: ``"auto"`` (default) cuts an ``nn.Sequential`` trunk after its downsampling
            children, keeping the deepest stage maps that fit ``stage_memory`` (much less
            recompute, see :mod:`lightstream.core.stages`; other trunks stream in one piece);
            ``None`` streams the trunk as one piece (memory flat in image size); a list of
            child indices cuts there.
        stage_memory: bytes the stitched maps may use: the trunk's output and, with ``"auto"``
            stages, the kept stage maps, each with its gradient; ``"auto"`` (default): 1.25 GiB,
            or a sixteenth of the GPU's memory when the trunk is on a larger GPU
            (:func:`~lightstream.core.stages.default_stage_memory`).
            What the maps leave over buys fewer dispatched operations: the deepest stages whose
            graphs fit it run as one tile without recompute, the others with larger tiles or
            batches (see :mod:`lightstream.core.planner`).
        tile_batch: how many tiles that run the same operations (interior tiles of equal shape)
            may run at once, stacked on the batch axis: far fewer, larger kernels, exactly the same
            values (see :mod:`lightstream.core.batching`). ``"auto"`` (default): as many as the
            tile budget plus the ``stage_memory`` the kept stage maps leave over holds (with
            stages; with ``stages=None``, one tile plus ``stage_memory``); ``1``: one tile at a time
            (memory of one tile); an int caps it.
        saliency: also compute the gradient with respect to the image in :meth:`backward`
            (stored in :attr:`saliency_map`).
        mean, std: optional per-channel normalisation applied to each tile on the device, so an
            image can stay ``uint8`` on the CPU (``(x - mean) / std``; integer tiles, and float
            tiles the trunk's dtype holds exactly, are cast to it first).
        progress: show a tqdm progress bar over tiles.

    Example::

        scnn = StreamingCNN(trunk, tile_size=1280)
        fmap = scnn(image)                 # no autograd graph is kept
        fmap.requires_grad_()
        loss = criterion(head(fmap), target)
        loss.backward()
        scnn.backward(image, fmap.grad)    # exact gradients into trunk's parameters

    Or let autograd drive the streamed backward (what :class:`~lightstream.modules.StreamingModule` does)::

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
        tile_batch: int | str = "auto",
        saliency: bool = False,
        mean: Sequence[float] | torch.Tensor | None = None,
        std: Sequence[float] | torch.Tensor | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if (tile_shape is None) == (tile_size is None):
            raise TypeError("give exactly one of tile_shape=(1, C, H, W) or tile_size=")
        self.stream_module = stream_module
        self.stages = stage_policy(stages, stream_module)
        self.stage_memory = stage_memory_setting(stage_memory)
        self.tile_batch = tile_batch_setting(tile_batch)
        self.saliency = saliency
        self.saliency_map: torch.Tensor | None = None
        self.progress = progress
        channels = input_channels(stream_module)
        self.register_buffer("mean", channel_vector(mean, "mean", channels), persistent=False)
        self.register_buffer("std", channel_vector(std, "std", channels, nonzero=True), persistent=False)
        self._traces = TraceCache(stream_module)
        self._normalisers = NormaliserCache()
        self._record: ForwardRecord | None = None
        self.tile_size = tile_pair(tile_shape, "tile_shape") if tile_shape is not None else tile_size  # type: ignore[assignment]

    # ------------------------------------------------------------------ settings and plans
    @property
    def tile_size(self) -> tuple[int, int]:
        """Tile ``(height, width)`` in image pixels; setting it re-plans (and checks it fits)."""
        return self._tile_size

    @tile_size.setter
    def tile_size(self, value: int | tuple[int, int]) -> None:
        pair = tile_pair(value)
        minimum = self.planner.first_stage(self.stages).geometry.min_tile_size()
        if pair[0] < minimum[0] or pair[1] < minimum[1]:
            raise TileTooSmallError(pair, minimum)
        self._tile_size = pair

    @property
    def planner(self) -> Planner:
        """The planner of the trunk as it is now (traced again when its modules changed)."""
        return self._traces.current()

    @property
    def geometry(self) -> Geometry:
        """The whole trunk's exact geometry (receptive field, output stride, plans, profile)."""
        return self.planner.geometry

    def stream_plan(self, image_shape: Sequence[int], dtype: torch.dtype | None = None) -> StreamPlan:
        """The plan for a ``(B, C, H, W)`` image (or one ``(C, H, W)``, or ``(H, W)``) with the current settings."""
        return self._plan(image_shape, dtype, self.stages, self.tile_batch)

    def loss_plan(self, image_shape: Sequence[int], dtype: torch.dtype | None = None) -> StreamPlan:
        """The plan :meth:`stream_loss` and :meth:`output_tiles` run: the trunk in one piece, one
        tile at a time unless ``tile_batch`` is an explicit number (``"auto"`` would spend
        ``stage_memory`` on batches, and a dense loss streams to keep memory flat)."""
        return self._plan(image_shape, dtype, None, 1 if self.tile_batch == "auto" else self.tile_batch)

    def _plan(self, image_shape: Sequence[int], dtype: torch.dtype | None, stages: StagePolicy,
              tile_batch: int | str) -> StreamPlan:
        shape = tuple(int(v) for v in image_shape)
        if len(shape) == 2:
            shape = (input_channels(self.stream_module) or 3, *shape)
        if len(shape) == 3:
            shape = (1, *shape)
        batch, channels, *size = checks.image_shape(shape, input_channels(self.stream_module))
        itemsize = (dtype or parameter_dtype(self.stream_module)).itemsize
        request = PlanRequest(tuple(size), batch, channels, itemsize, self.tile_size, stages,  # type: ignore[arg-type]
                              self.stage_memory_bytes, tile_batch, TimeModel.for_device(self.device),
                              spends_spare_memory(self.device))
        return self.planner.plan(request)

    def stage_plans(self, image_shape: Sequence[int], dtype: torch.dtype | None = None) -> list[StagePlan]:
        """Per stage: its tile size and tile plan, for a ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` image."""
        return list(self.stream_plan(image_shape, dtype).stages)

    def plan(self, image_size: Sequence[int]) -> TilePlan:
        """The tiles over the image (the first stage's plan) for ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``."""
        return self.stream_plan(image_size).first

    def estimate(self, image_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 time_model: TimeModel | None = None, *, per_tile_loss: bool = False) -> StepEstimate:
        """Predicted time ratio and memory of a training step on a ``(B, C, H, W)`` batch.

        Computed from the plan and the planner's cost model (no real data is run), so a
        tile-size slider can call it. ``time_model`` defaults to the one for the trunk's device
        (:meth:`TimeModel.for_device`). ``per_tile_loss=True`` estimates a :meth:`stream_loss`
        step instead of forward + :meth:`backward` (one piece, no recomputation, no stitched output).
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"estimate: dtype must be a floating-point torch.dtype, not {dtype!r}")
        shape = checks.image_shape(image_shape, input_channels(self.stream_module))
        plan = self.loss_plan(shape, dtype) if per_tile_loss else self.stream_plan(shape, dtype)
        costs = self.planner.costs([p.stage for p in plan.stages], plan.request.channels)
        return estimate_step([(p.stage.graph, p.plan, c) for p, c in zip(plan.stages, costs)],
                             plan.request.batch, plan.request.itemsize,
                             time_model or TimeModel.for_device(self.device), [p.tile_batch for p in plan.stages],
                             per_tile_loss=per_tile_loss,
                             forward_plans=[None if p.forward_plan is None else (p.forward_plan, p.forward_tile_batch)
                                            for p in plan.stages])

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

    # ------------------------------------------------------------------ inputs
    def prepare_input(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` as the trunk's first layer sees it: on the trunk's device, cast to its dtype
        (integer images, lossless float casts), normalised by ``mean`` and ``std`` (as every tile is)."""
        preparer = self._preparer()
        return preparer.normalise(preparer.on_device(image))

    def _preparer(self, normaliser: Normaliser | None = None) -> TilePreparer:
        device = self.device
        dtype = next((p.dtype for p in self.stream_module.parameters() if p.is_floating_point()), None)
        normaliser = normaliser or self._normalisers.get(self.mean, self.std, input_channels(self.stream_module),
                                                         device, dtype or torch.get_default_dtype())
        return TilePreparer(device, dtype, normaliser)

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Stream the trunk over ``image`` (``[B, C, H, W]`` tensor or lazy source).

        Returns the stitched feature map, detached from autograd; the image may stay on the CPU.
        With gradients enabled, the stage maps a later :meth:`backward` needs are kept.
        """
        out, self._record = self._stream(image, keep=torch.is_grad_enabled(), want_image_grad=self.saliency)
        return out

    def forward_autograd(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Like :meth:`forward`, but the result is part of the autograd graph.

        ``loss.backward()`` then runs the streamed backward by itself and delivers the trunk's
        gradients through autograd (so DDP, gradient accumulation and hooks see them as usual),
        and the image gradient if ``image`` requires grad.
        """
        lazy, tensor = (None, image) if isinstance(image, torch.Tensor) else (image, None)
        return _StreamedTrunk.apply(self, lazy, tensor, *self._trainable_parameters())

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.stream_module.parameters() if p.requires_grad]

    def _stream(self, image: torch.Tensor | ImageSource, keep: bool, want_image_grad: bool
                ) -> tuple[torch.Tensor, ForwardRecord]:
        source = as_source(image)
        planner, plan = self.planner, self.stream_plan(source.shape)
        preparer, autocast = self._preparer(), Autocast.current(self.device)
        with torch.no_grad():
            out, kept = Executor(preparer, self.progress).forward(plan, source, keep, want_image_grad)
        record = ForwardRecord.of(planner, plan, image, self.stream_module, out, autocast, preparer.normalise,
                                  kept if keep else None)
        return out, record

    # ------------------------------------------------------------------ backward
    def backward(self, image: torch.Tensor | ImageSource, grad: torch.Tensor) -> None:
        """Backpropagate ``grad`` (the gradient of the stitched feature map) through the trunk.

        ``image`` is the object given to the forward. Gradients accumulate into the trunk's
        parameters' ``.grad``, exactly as if the whole image had gone through the trunk. With
        ``saliency=True`` the image gradient is stored in :attr:`saliency_map`.

        Raises:
            StaleForwardError: when the forward cannot be reproduced (see
                :mod:`lightstream.core.record`); nothing is changed then.
        """
        params = self._trainable_parameters()
        grads, image_grad = self._backward(self._record, image, grad, params, self.saliency, "backward")
        _add_to_grad(params, grads)
        self.saliency_map = image_grad

    def input_gradient(self, image: torch.Tensor | ImageSource, grad: torch.Tensor) -> torch.Tensor:
        """The image gradient (saliency map) of the last forward for feature-map gradient ``grad``.

        Parameter gradients are neither computed nor touched. The result has the image's full
        size (on the image's device; host memory for a lazy source).
        """
        image_grad = self._backward(self._record, image, grad, [], True, "input_gradient")[1]
        assert image_grad is not None
        return image_grad

    def _backward(self, record: ForwardRecord | None, image: Any, grad: torch.Tensor,
                  params: list[torch.Tensor], want_image_grad: bool, what: str
                  ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        if record is None:
            raise StaleForwardError(f"{what}: no forward to backpropagate; call scnn(image) first")
        record.check(image, grad, self.planner, self._preparer().normalise, what)
        record.used = True
        kept, record.kept = record.kept, None
        executor = Executor(self._preparer(record.normaliser), self.progress)
        return executor.backward(record.plan, as_source(image), grad, kept, params, want_image_grad,
                                 record.autocast)

    # ------------------------------------------------------------------ dense outputs
    def stream_loss(self, image: torch.Tensor | ImageSource, target: torch.Tensor | ImageSource,
                    loss_fn: LossFunction, reduction: str = "mean", *, ignore_index: int | None = None,
                    weight: torch.Tensor | ImageSource | None = None, on_tile: TileCallback | None = None
                    ) -> torch.Tensor:
        """A per-pixel loss of the trunk's output, computed and backpropagated tile by tile.

        For every output tile: the forward with a graph, ``loss_fn(output_tile, target_tile)``
        and the backward; the whole output is never held (see :mod:`lightstream.core.dense`).
        Returns the whole-image loss (a detached scalar) and, with gradients enabled, adds to the
        trunk's parameters' ``.grad`` exactly the gradients of ``loss_fn(trunk(image), target)``
        reduced over the whole image (and stores the image gradient in :attr:`saliency_map`
        with ``saliency=True``). Under ``torch.no_grad()`` it only computes the loss.

        Args:
            image: ``[B, C, H, W]`` tensor or lazy source.
            target: aligned with the output: ``[B, h, w]`` (e.g. class indices) or
                ``[B, K, h, w]`` tensor, or an :class:`ImageSource` (a one-channel source such
                as a label mask gives ``[B, h, w]`` tiles).
            loss_fn: ``loss_fn(output_tile, target_tile)`` returning the *un-reduced* per-pixel
                loss, e.g. ``lambda o, t: F.cross_entropy(o, t.long(), reduction="none")``.
            reduction: ``"mean"`` over the counted pixels, or ``"sum"``.
            ignore_index: pixels whose target equals it do not count (weight 0), as in
                ``F.cross_entropy(..., ignore_index=)``'s mean.
            weight: per-pixel weights aligned with the output (tensor or source); the mean is
                then ``sum(weight * loss) / sum(weight)``.
            on_tile: called as ``on_tile(output_tile, target_tile)`` with every detached output
                tile (e.g. to update Dice or IoU metrics, whose counts add up over tiles).

        The trunk streams in one piece here: each tile's backward follows its forward at once,
        so nothing is recomputed and memory is that of one tile batch.
        """
        params = self._trainable_parameters()
        result = self._stream_loss(image, target, loss_fn, reduction, ignore_index, weight, on_tile, params,
                                   self.saliency)
        _add_to_grad(params, result.grads)
        if torch.is_grad_enabled() and self.saliency:
            self.saliency_map = result.image_grad
        return result.loss

    def stream_loss_autograd(self, image: torch.Tensor | ImageSource, target: torch.Tensor | ImageSource,
                             loss_fn: LossFunction, reduction: str = "mean", *, ignore_index: int | None = None,
                             weight: torch.Tensor | ImageSource | None = None,
                             on_tile: TileCallback | None = None) -> torch.Tensor:
        """Like :meth:`stream_loss`, but the loss is part of the autograd graph.

        The tiles' forward and backward run here; ``loss.backward()`` then delivers the trunk's
        gradients (times the loss's gradient) through autograd, so Lightning's automatic
        optimisation, DDP's gradient reduction, accumulation and clipping see them as usual,
        and the image gradient when ``image`` requires grad.
        """
        options = (target, loss_fn, reduction, ignore_index, weight, on_tile)
        if not torch.is_grad_enabled():
            return self._stream_loss(image, *options, [], False).loss
        lazy, tensor = (None, image) if isinstance(image, torch.Tensor) else (image, None)
        return _StreamedLoss.apply(self, lazy, tensor, options, *self._trainable_parameters())

    def output_tiles(self, image: torch.Tensor | ImageSource
                     ) -> Iterator[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
        """The trunk's output tile by tile: ``(output_tile, (row_lo, row_hi), (col_lo, col_hi))``.

        No autograd graph, and the whole output is never held: for validation and for writing
        predictions of a large image to disk. The tiles partition the output map.
        """
        source = as_source(image)
        return self._dense_streamer(source).output_tiles(source)

    def _dense_streamer(self, source: ImageSource) -> DenseStreamer:
        plan = self.loss_plan(source.shape)
        return DenseStreamer(plan.stages[0], Executor(self._preparer(), self.progress), Autocast.current(self.device))

    def _stream_loss(self, image: torch.Tensor | ImageSource, target: torch.Tensor | ImageSource,
                     loss_fn: LossFunction, reduction: str, ignore_index: int | None,
                     weight: torch.Tensor | ImageSource | None, on_tile: TileCallback | None,
                     params: list[nn.Parameter], want_image_grad: bool) -> LossResult:
        if reduction not in REDUCTIONS:
            raise ValueError(f"stream_loss: reduction must be one of {REDUCTIONS}, not {reduction!r}")
        if not callable(loss_fn):
            raise TypeError(f"stream_loss: loss_fn must be callable, not {type(loss_fn).__name__}")
        source = as_source(image)
        streamer = self._dense_streamer(source)
        output_shape = (source.shape[0], *streamer.output_shape)
        pixel_target = PixelTarget.of(target, "target", output_shape)
        pixel_weight = None if weight is None else PixelTarget.of(weight, "weight", output_shape)
        return streamer.loss(source, pixel_target, loss_fn, reduction, params, want_image_grad, ignore_index,
                             pixel_weight, on_tile)


def _add_to_grad(params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> None:
    """Accumulate ``grads`` into the parameters' ``.grad`` as autograd would."""
    for param, g in zip(params, grads):
        if g is not None:
            param.grad = g if param.grad is None else param.grad.add_(g)


class _StreamedLoss(torch.autograd.Function):
    """Autograd node of a streamed loss: the tiles' gradients, computed in its forward, are its backward."""

    @staticmethod
    def forward(ctx: Any, engine: StreamingCNN, lazy: ImageSource | None, tensor: torch.Tensor | None,
                options: tuple, *params: torch.Tensor) -> torch.Tensor:
        want_image_grad = tensor is not None and tensor.requires_grad
        with torch.enable_grad():
            result = engine._stream_loss(tensor if tensor is not None else lazy, *options, list(params),
                                         want_image_grad)
        ctx.grads, ctx.image_grad = result.grads, result.image_grad
        return result.loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.grads]
        image_grad = None if ctx.image_grad is None else ctx.image_grad * grad.to(ctx.image_grad.dtype)
        return (None, None, image_grad, None, *grads)


class _StreamedTrunk(torch.autograd.Function):
    """Autograd node of a streamed trunk: its backward is the streamed backward."""

    @staticmethod
    def forward(ctx: Any, engine: StreamingCNN, lazy: ImageSource | None, tensor: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        image = tensor if tensor is not None else lazy
        ctx.engine, ctx.image, ctx.params = engine, image, list(params)
        want_image_grad = tensor is not None and tensor.requires_grad
        out, ctx.record = engine._stream(image, keep=True, want_image_grad=want_image_grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        want_image = bool(ctx.needs_input_grad[2])
        grads, image_grad = ctx.engine._backward(ctx.record, ctx.image, grad, ctx.params, want_image,
                                                 "backward of forward_autograd")
        return (None, None, image_grad, *grads)
