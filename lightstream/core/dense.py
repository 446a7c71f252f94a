"""Dense outputs: a per-pixel loss streamed tile by tile, and output tiles that are never stitched.

A segmentation trunk (a U-Net, a feature pyramid) ends at the image's resolution or close to it,
so its whole output does not fit in memory on a large slide (65536² pixels × 2 classes in
float32 is 34 GB, and its gradient as much again). :class:`DenseStreamer` therefore never
stitches it:

- :meth:`DenseStreamer.loss` runs, for each batch of output tiles, the trunk's forward with a
  graph, the user's un-reduced per-pixel ``loss_fn(output_tile, target_tile)`` and the
  backward, and adds up the loss and the gradients.
- :meth:`DenseStreamer.output_tiles` yields the output tile by tile, without a graph, for
  validation, metrics and writing predictions to disk.

Why it is exact: a per-pixel loss is a sum over output pixels (of ``weight * loss``; ignored
pixels weigh 0). The tiles' owned outputs partition the output map, and each tile computes its
pixels as the same function of the weights and the image as the whole image does (see
:mod:`lightstream.core.graph`), so the gradient of the whole sum is the sum of the tiles'
gradients. A mean divides that sum by the number of counted pixels (or the sum of the weights),
which is known only after the last tile: the tiles' gradients are summed unscaled and divided
once at the end.

The trunk streams in one piece (no kept stage maps): every tile's forward is followed at once by
its backward, so nothing is recomputed and memory stays that of one tile, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .execution import Executor, _per_tile, _stack, backpropagate
from .inputs import Autocast
from .source import ImageSource, TensorSource
from .stages import StagePlan

__all__ = ["DenseStreamer", "LossFunction", "PixelTarget", "TileCallback", "REDUCTIONS"]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(output_tile, target_tile)``: an un-reduced, per-pixel loss of the tile."""

TileCallback = Callable[[torch.Tensor, torch.Tensor], None]
"""``on_tile(output_tile, target_tile)``, called with every (detached) output tile."""

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class PixelTarget:
    """A target (or weight map) aligned with the trunk's output, read one tile at a time.

    ``squeeze``: a ``[B, h, w]`` tensor or a one-channel source (a label mask) is handed to the
    loss as ``[B, h, w]`` tiles; a ``[B, K, h, w]`` tensor as ``[B, K, h, w]`` tiles.
    """

    source: ImageSource
    squeeze: bool

    @classmethod
    def of(cls, value: Any, name: str, output_shape: tuple[int, int, int]) -> PixelTarget:
        """Check that ``value`` is aligned with an output of ``(B, h, w)`` and wrap it.

        Raises:
            TypeError: when ``value`` is neither a tensor nor an :class:`ImageSource`.
            ValueError: when its batch or spatial size differs from the output's.
        """
        if isinstance(value, torch.Tensor):
            if value.dim() not in (3, 4):
                raise ValueError(f"{name} must be a [B, h, w] or [B, K, h, w] tensor aligned with the trunk's "
                                 f"output {_shape_text(output_shape)}, got shape {tuple(value.shape)}")
            target = cls(TensorSource(value.unsqueeze(1) if value.dim() == 3 else value), value.dim() == 3)
        elif isinstance(value, ImageSource):
            target = cls(value, value.shape[1] == 1)
        else:
            raise TypeError(f"{name} must be a tensor or an ImageSource (e.g. a label mask), "
                            f"not {type(value).__name__}")
        batch, _, height, width = target.source.shape
        if (batch, height, width) != output_shape:
            raise ValueError(f"{name} of shape {tuple(target.source.shape)} is not aligned with the trunk's output "
                             f"{_shape_text(output_shape)}: give it the output's batch, height and width "
                             "(for a trunk that downsamples, subsample the mask to the output stride)")
        return target

    def read(self, rows: slice, cols: slice, device: torch.device) -> torch.Tensor:
        tile = self.source.read(rows, cols).to(device, non_blocking=True)
        return tile.squeeze(1) if self.squeeze else tile


def _shape_text(shape: tuple[int, int, int]) -> str:
    return f"(batch {shape[0]}, {shape[1]}x{shape[2]} px)"


@dataclass
class LossResult:
    """What :meth:`DenseStreamer.loss` computed: the loss, and the gradients it implies."""

    loss: torch.Tensor
    grads: list[torch.Tensor | None]
    image_grad: torch.Tensor | None


class DenseStreamer:
    """Runs a one-piece plan tile batch by tile batch for a loss or for output tiles.

    Args:
        stage_plan: the trunk's single-stage plan.
        executor: reads, prepares and runs the tile batches.
        autocast: the autocast state to run the tiles (and the loss) under.
    """

    def __init__(self, stage_plan: StagePlan, executor: Executor, autocast: Autocast) -> None:
        self.stage_plan = stage_plan
        self.executor = executor
        self.autocast = autocast

    @property
    def output_shape(self) -> tuple[int, int]:
        return self.stage_plan.plan.output_size

    def output_tiles(self, source: ImageSource) -> Iterator[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
        """Each output tile with its rows and columns of the output map (no autograd graph)."""
        for batch, raw in self.executor._load_batches(source, self.stage_plan.batches, "prediction"):
            with torch.no_grad(), self.autocast():
                y = self.executor._run_batch(self.stage_plan, batch, self.executor.prepare(raw, True)[1])
            for tile, part in zip(batch.tiles, _per_tile(y, len(batch))):
                yield part, (tile.output.top, tile.output.bottom), (tile.output.left, tile.output.right)

    def loss(self, source: ImageSource, target: PixelTarget, loss_fn: LossFunction, reduction: str,
             params: list[torch.Tensor], want_image_grad: bool, ignore_index: int | None = None,
             weight: PixelTarget | None = None, on_tile: TileCallback | None = None) -> LossResult:
        """The whole-image loss and, with gradients enabled, its parameter and image gradients."""
        backward = torch.is_grad_enabled() and bool(params or want_image_grad)
        total: torch.Tensor | None = None
        counted: torch.Tensor | int = 0  # pixels kept as a host int: no host-to-device copy a tile
        grads: list[torch.Tensor | None] = [None] * len(params)
        image_grad: torch.Tensor | None = None
        for batch, raw in self.executor._load_batches(source, self.stage_plan.batches, "loss"):
            with torch.set_grad_enabled(backward), self.autocast():
                leaf, x = self.executor.prepare(raw, True, requires_grad=backward and want_image_grad)
                y = self.executor._run_batch(self.stage_plan, batch, x)
                wanted = _stack([target.read(t.output.rows, t.output.cols, y.device) for t in batch.tiles])
                pixel_loss = _checked_loss(loss_fn(y, wanted), y, batch.lead.output.height, batch.lead.output.width)
                pixel_weight = self._weights(wanted, weight, batch, pixel_loss, ignore_index)
                if pixel_weight is not None:
                    pixel_loss = torch.where(pixel_weight != 0, pixel_loss * pixel_weight, 0.0)
                tile_sum = pixel_loss.sum()
            # Sums over the whole image in float64: a float32 count is inexact past 2**24 pixels.
            count = pixel_loss.numel() if pixel_weight is None else pixel_weight.sum(dtype=torch.float64)
            if on_tile is not None:
                for part, part_target in zip(_per_tile(y.detach(), len(batch)), _per_tile(wanted, len(batch))):
                    on_tile(part, part_target)
            if backward:
                image_grad = backpropagate(tile_sum, None, params, leaf if want_image_grad else None, batch, source,
                                           grads, image_grad)
            loss_dtype = tile_sum.dtype
            total = tile_sum.detach().double() + (0 if total is None else total)
            counted = count + counted
        assert total is not None, "a plan has at least one tile"
        if reduction == "mean":
            total = total / counted
            grads = [None if g is None else g / _on(counted, g) for g in grads]
            image_grad = None if image_grad is None else image_grad / _on(counted, image_grad)
        return LossResult(total.to(loss_dtype), grads, image_grad)

    @staticmethod
    def _weights(wanted: torch.Tensor, weight: PixelTarget | None, batch: Any, pixel_loss: torch.Tensor,
                 ignore_index: int | None) -> torch.Tensor | None:
        """Per-pixel weights of the batch's loss: 0 where the target is ``ignore_index``, else ``weight``."""
        weights = None
        if ignore_index is not None:
            weights = (wanted != ignore_index).to(pixel_loss.dtype)
        if weight is not None:
            w = _stack([weight.read(t.output.rows, t.output.cols, pixel_loss.device) for t in batch.tiles])
            w = w.to(pixel_loss.dtype)
            weights = w if weights is None else weights * w
        if weights is not None and weights.shape != pixel_loss.shape:
            try:
                weights = weights.expand_as(pixel_loss)
            except RuntimeError:
                raise ValueError(f"the per-pixel weights (from ignore_index or weight=) have shape "
                                 f"{tuple(weights.shape)} for a tile, which does not broadcast to the loss "
                                 f"tile's {tuple(pixel_loss.shape)}; give a target/weight shaped like the "
                                 "loss") from None
        return weights


def _on(count: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | int:
    """A summed weight on ``like``'s device (a pixel count stays a host int)."""
    return count.to(like.device) if isinstance(count, torch.Tensor) else count


def _checked_loss(pixel_loss: Any, output: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``loss_fn``'s result, refused unless it is a per-pixel map of the tile."""
    if not isinstance(pixel_loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, not {type(pixel_loss).__name__}")
    if pixel_loss.dim() < 2 or tuple(pixel_loss.shape[-2:]) != (height, width) or pixel_loss.shape[0] != output.shape[0]:
        raise ValueError(
            f"loss_fn returned shape {tuple(pixel_loss.shape)} for an output tile of shape {tuple(output.shape)}: "
            "stream_loss needs the un-reduced per-pixel loss ([B, h, w] or [B, K, h, w], e.g. "
            "F.cross_entropy(output, target, reduction='none')); it reduces over the whole image itself")
    return pixel_loss
