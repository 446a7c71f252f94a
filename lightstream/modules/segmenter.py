"""ImageSegmenter: a ready dense-prediction task (one class per pixel) on a streamed trunk.

The trunk is the whole network (e.g. a :class:`~lightstream.models.UNet`): its output is the logit
map ``[B, num_classes, h, w]``, which for a slide does not fit in memory, so the loss, the metrics
and the prediction are all computed tile by tile and the whole output is never stitched:

* training: :meth:`StreamingCNN.stream_loss_autograd` runs each output tile's forward, the
  per-pixel loss and its backward, and returns the whole-image loss attached to autograd, so
  Lightning's ``loss.backward()`` delivers exactly the gradients of the whole-image loss (and DDP,
  gradient accumulation, clipping and the precision plugin apply as for any module);
* validation and test: :meth:`StreamingCNN.output_tiles` without gradients; the loss is the sum of
  the tiles' per-pixel losses over the number of counted pixels, and the metrics are updated per
  tile. The default metrics (Dice and IoU) accumulate confusion counts, so summed over tiles they
  equal the whole image's;
* prediction: :meth:`ImageSegmenter.predict_step` returns the class map; for a slide,
  :func:`~lightstream.data.predict_segmentation` writes it to a pyramidal TIFF tile by tile.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from ..core import ImageSource
from ..core.dense import PixelTarget
from .classifier import MetricsArg
from .streaming import StreamingModule

__all__ = ["ImageSegmenter", "segmentation_metrics"]

Tiles = Iterator[tuple[Tensor, tuple[int, int], tuple[int, int]]]


def segmentation_metrics(num_classes: int, ignore_index: int | None = None) -> MetricCollection:
    """Pixel Dice (the F1 score of each class, macro-averaged) and IoU (Jaccard index, macro).

    Both are computed from confusion counts summed over every pixel they are updated with, so
    updating them tile by tile gives the whole image's values (and over an epoch, the values of
    all its pixels together). Pixels whose target is ``ignore_index`` are not counted.
    """
    return MetricCollection({
        "dice": MulticlassF1Score(num_classes, average="macro", multidim_average="global", ignore_index=ignore_index),
        "iou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
    })


class ImageSegmenter(StreamingModule):
    """Streamed dense network, per-pixel loss and torchmetrics metrics: semantic segmentation.

    Batches are ``(image, target)`` with ``image`` ``[B, C, H, W]`` (tensor or image source) and
    ``target`` the class index of every output pixel, ``[B, h, w]`` (or ``[B, 1, h, w]``, or a
    one-channel image source such as a :class:`~lightstream.data.LabelMask`), where ``(h, w)`` is
    the trunk's output size (the image's for a U-Net); or one
    :class:`~lightstream.data.SegmentationSample` as ``DataLoader(segmentation_dataset,
    batch_size=1, collate_fn=collate_single)`` yields it. Logs ``{stage}_loss`` and every metric
    as ``{stage}_{name}`` (default ``dice`` and ``iou``) for ``train``, ``val`` and ``test``.

    Args:
        stream_network: the trunk, returning logits ``[B, num_classes, h, w]`` (streamed).
        tile_size: tile height and width in image pixels.
        num_classes: classes of the output (for the default metrics).
        loss_fn: per-pixel loss ``loss_fn(logits, target) -> [B, h, w]`` (no reduction; ``target``
            is given as ``int64`` class indices); default cross entropy with ``ignore_index``.
            The loss of an image is its mean over the counted pixels.
        train_streaming_layers: train the trunk (``False`` freezes it; nothing then trains).
        metrics: torchmetrics metric(s) updated per tile with ``(class_map, target)``, cloned per
            stage; default :func:`segmentation_metrics`. Use metrics whose states add over tiles.
        ignore_index: target value of pixels that count neither in the loss nor in the metrics.
        lr: learning rate of the default optimiser (Adam over :meth:`get_trainable_params`).
        **kwargs: to :class:`~lightstream.modules.StreamingModule` (``mean``, ``std``, ...).
    """

    def __init__(
        self,
        stream_network: nn.Module,
        tile_size: int | tuple[int, int],
        num_classes: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        train_streaming_layers: bool = True,
        metrics: MetricsArg = None,
        *,
        ignore_index: int | None = None,
        lr: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        _check_segmenter_arguments(num_classes, loss_fn, ignore_index, lr)
        super().__init__(stream_network, tile_size, train_streaming_layers, **kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.lr = lr
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(
            reduction="none", ignore_index=-100 if ignore_index is None else ignore_index)
        self.save_hyperparameters(ignore=["stream_network", "loss_fn", "metrics"])
        collection = segmentation_metrics(num_classes, ignore_index) if metrics is None else MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix="train_")
        self.val_metrics = collection.clone(prefix="val_")
        self.test_metrics = collection.clone(prefix="test_")

    # ------------------------------------------------------------------ the per-pixel loss
    def pixel_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``loss_fn`` on a tile: ``[B, h, w]`` per-pixel losses of ``logits`` against class indices.

        Raises:
            ValueError: ``loss_fn`` did not return one loss per pixel (e.g. it reduced them).
        """
        target = _class_indices(target)
        loss = self.loss_fn(logits, target)
        if not isinstance(loss, Tensor) or loss.shape != target.shape:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return one loss per pixel, shape {list(target.shape)} like the target "
                             f"tile, got {shape}: use an unreduced loss (reduction='none')")
        return loss

    def _counted(self, target: Tensor) -> Tensor:
        """Pixels of ``target`` that count in the loss: all but those equal to ``ignore_index``."""
        if self.ignore_index is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != self.ignore_index

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor | ImageSource) -> Tensor:
        """Class map ``[B, h, w]`` of the images ``x`` (``uint8`` up to 256 classes): the argmax of
        each output tile, never the whole logit map."""
        classes: Tensor | None = None
        with torch.no_grad():
            for logits, (r0, r1), (c0, c1) in self._output_tiles(x):
                if classes is None:
                    size = self.stream_network.plan(x.shape).output_size
                    dtype = torch.uint8 if logits.shape[1] <= 256 else torch.int64
                    classes = torch.empty(logits.shape[0], *size, dtype=dtype, device=logits.device)
                classes[:, r0:r1, c0:c1] = logits.argmax(1)
        assert classes is not None  # a plan has at least one tile
        return classes

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss of one batch, streamed tile by tile; its ``backward()`` gives the trunk's exact gradients."""
        image, target = self._image_and_target(batch, "train")
        loss = self._loss(self._track_saliency(image), target, self.train_metrics)
        self._log_stage("train", loss, self.train_metrics, image.shape[0])
        return loss

    def _loss(self, image: Tensor | ImageSource, target: Tensor | ImageSource, metrics: MetricCollection) -> Tensor:
        """The batch's loss (``stream_loss_autograd``: under ``no_grad`` only the loss), metrics updated per tile."""
        if not self._streaming_hooks_enabled:
            return self._whole_image_loss(image, target, metrics)
        return self.stream_network.stream_loss_autograd(
            image, target, self.pixel_loss, ignore_index=self.ignore_index,
            on_tile=lambda logits, tile_target: metrics.update(logits.argmax(1), _class_indices(tile_target)))

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss and metrics of one validation batch, tile by tile."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss and metrics of one test batch, tile by tile."""
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class map ``[B, h, w]`` of a batch (``image``, ``(image, ...)`` or a segmentation sample).

        For slides larger than memory use :func:`~lightstream.data.predict_segmentation`, which
        writes the map to a TIFF tile by tile instead.
        """
        image = batch.image if _is_sample(batch) else batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(image)

    def on_validation_start(self) -> None:
        """Ready streaming, and start the validation metrics afresh (call ``super()`` in overrides).

        The reset re-creates their states in this loop's grad mode: after ``trainer.validate``
        (inference mode) they would otherwise be inference tensors, which the validation inside
        ``trainer.fit`` (no_grad) cannot update in place.
        """
        super().on_validation_start()
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        """Ready streaming, and start the test metrics afresh (call ``super()`` in overrides)."""
        super().on_test_start()
        self.test_metrics.reset()

    def _evaluate(self, batch: Any, stage: str) -> Tensor:
        image, target = self._image_and_target(batch, stage)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        with torch.no_grad():
            loss = self._loss(image, target, metrics)
        self._log_stage(stage, loss, metrics, image.shape[0])
        return loss

    def _pixel_target(self, image: Tensor | ImageSource, target: Tensor | ImageSource) -> PixelTarget:
        """``target`` checked against the trunk's output for ``image`` and read tile by tile.

        Raises:
            ValueError: the target's batch or spatial size is not the output's.
        """
        output_size = self.stream_network.plan(image.shape).output_size
        return PixelTarget.of(target, "target", (image.shape[0], *output_size))

    def _output_tiles(self, image: Tensor | ImageSource) -> Tiles:
        """The trunk's output in tiles without gradients (one tile, the whole map, when streaming is off)."""
        if self._streaming_hooks_enabled:
            yield from self.stream_network.output_tiles(image)
            return
        with torch.no_grad():
            logits = self.stream_network.stream_module(self._whole_image(image))
        yield logits, (0, logits.shape[2]), (0, logits.shape[3])

    def _whole_image_loss(self, image: Tensor | ImageSource, target: Tensor | ImageSource,
                          metrics: MetricCollection) -> Tensor:
        """The reference without tiles (after :meth:`disable_streaming_hooks`): ordinary autograd."""
        pixel_target = self._pixel_target(image, target)
        logits = self.stream_network.stream_module(self._whole_image(image))
        whole_target = _class_indices(pixel_target.read(slice(None), slice(None), logits.device))
        keep = self._counted(whole_target)
        metrics.update(logits.detach().argmax(1), whole_target)
        return self.pixel_loss(logits, whole_target)[keep].sum() / keep.sum()

    def _log_stage(self, stage: str, loss: Tensor, metrics: MetricCollection, batch_size: int) -> None:
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)

    def _image_and_target(self, batch: Any, stage: str) -> tuple[Tensor | ImageSource, Tensor | ImageSource]:
        """``(image, target)`` of a batch (the target is checked where it is read, against the output's size)."""
        if _is_sample(batch):
            image, target = batch.image, batch.target
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            image, target = batch[0], batch[1]
        else:
            raise ValueError(f"{stage} batches need a per-pixel target: (image, target) or a SegmentationSample, "
                             f"got {type(batch).__name__}")
        return image, target

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A segmentation sample stays on the host, where the engine reads its tiles from (moving each
        tile to the device); other batches move as Lightning moves them."""
        if _is_sample(batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with learning rate ``lr`` over the parameters that require gradients."""
        return torch.optim.Adam(self.get_trainable_params(), lr=self.lr)


def _class_indices(target: Tensor) -> Tensor:
    """A target tile as ``int64`` class indices ``[B, h, w]`` (a channel axis of one is dropped).

    Raises:
        ValueError: the target has several channels or is not integer.
    """
    if target.dim() == 4:
        if target.shape[1] != 1:
            raise ValueError(f"segmentation targets are class indices [B, h, w] (or [B, 1, h, w]), got a tile of "
                             f"shape {list(target.shape)}; for soft or multi-label targets, subclass and override "
                             "the steps")
        target = target[:, 0]
    if target.is_floating_point():
        raise ValueError(f"segmentation targets must be integer class indices, got {target.dtype}")
    return target.long()


def _is_sample(batch: Any) -> bool:
    """A :class:`~lightstream.data.SegmentationSample` or a dataclass like it (``image`` and ``target``)."""
    return dataclasses.is_dataclass(batch) and hasattr(batch, "image") and hasattr(batch, "target")


def _check_segmenter_arguments(num_classes: Any, loss_fn: Any, ignore_index: Any, lr: Any) -> None:
    """Refuse arguments of the wrong kind at construction, not at the first step."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(logits, target) -> per-pixel loss, got {loss_fn!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an integer class value or None, got {ignore_index!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
