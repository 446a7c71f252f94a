"""ImageClassifier: a ready whole-image classification task on a streamed trunk."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from .streaming import StreamingModule

__all__ = ["ImageClassifier"]

MetricsArg = Metric | MetricCollection | Sequence[Metric] | Mapping[str, Metric] | None


class ImageClassifier(StreamingModule):
    """Streamed trunk, then a head, a loss and torchmetrics metrics: whole-image classification.

    Batches are ``(image, target)`` with ``image`` a ``[B, C, H, W]`` tensor (or an image source
    the engine can read tiles from), or one :class:`~lightstream.data.SlideSample` as
    ``DataLoader(slide_dataset, batch_size=1, collate_fn=collate_single)`` yields it (its label
    becomes a batch of one). Logs ``{stage}_loss`` and every metric as
    ``{stage}_{name}`` for the stages ``train``, ``val`` and ``test`` with ``self.log``.
    Use it directly or subclass it (override :meth:`configure_optimizers`, the steps, ...).

    Args:
        stream_network: the trunk (streamed).
        head: maps the stitched feature map ``[B, C', h, w]`` to logits ``[B, classes]``; it
            holds the global pooling, which cannot be streamed.
        tile_size: tile height and width in image pixels.
        loss_fn: ``loss_fn(logits, target)``; default ``nn.CrossEntropyLoss()``.
        train_streaming_layers: train the trunk (``False`` trains the head only).
        metrics: torchmetrics metric(s), cloned once per stage; updated with ``(logits, target)``.
        lr: learning rate of the default optimiser (Adam over :meth:`get_trainable_params`).
        predict_feature_map: :meth:`predict_step` returns ``(logits, feature_map)`` instead of
            the logits alone.
        **kwargs: passed to :class:`~lightstream.modules.StreamingModule` (``tile_cache_dir``,
            ``mean``, ``std``, ``saliency``, ``progress``...).
    """

    def __init__(
        self,
        stream_network: nn.Module,
        head: nn.Module,
        tile_size: int | tuple[int, int],
        loss_fn: nn.Module | None = None,
        train_streaming_layers: bool = True,
        metrics: MetricsArg = None,
        *,
        lr: float = 1e-4,
        predict_feature_map: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_task_arguments(head, loss_fn, lr)
        super().__init__(stream_network, tile_size, train_streaming_layers, **kwargs)
        self.head = head
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.lr = lr
        self.predict_feature_map = predict_feature_map
        # the modules are in the checkpoint's state dict: load_from_checkpoint(path, stream_network=...,
        # head=...) rebuilds the rest (tile size, lr, normalisation...) from the saved arguments
        self.save_hyperparameters(ignore=["stream_network", "head", "loss_fn", "metrics"])
        collection = None if metrics is None else MetricCollection(metrics)
        self.train_metrics = None if collection is None else collection.clone(prefix="train_")
        self.val_metrics = None if collection is None else collection.clone(prefix="val_")
        self.test_metrics = None if collection is None else collection.clone(prefix="test_")

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the images ``x``: the streamed trunk, then the head."""
        return self.forward_head(self.forward_streaming(x))

    def forward_head(self, feature_map: Tensor) -> Tensor:
        """Logits from a stitched feature map.

        Raises:
            RuntimeError: the head fails on the feature map (typically its first layer expects
                another number of channels than the trunk gives); the message names the map's shape.
        """
        try:
            return self.head(feature_map)
        except RuntimeError as err:
            if type(err) is not RuntimeError:  # out of memory, not implemented...: not a shape error
                raise
            raise RuntimeError(f"the head failed on the trunk's feature map of shape {list(feature_map.shape)}: "
                               f"{err} (where shapes disagree: the head's first layer must take the trunk's "
                               f"{feature_map.shape[1]} output channels)") from err

    def _step(self, batch: Any, stage: str) -> Tensor:
        image, target = _image_and_target(batch)
        if target is None:
            raise ValueError(f"{stage} batches need a target: (image, target) or a SlideSample")
        logits = self(image)
        loss = self.loss_fn(logits, target)
        batch_size = int(target.shape[0])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=batch_size)
        metrics: MetricCollection | None = getattr(self, f"{stage}_metrics")
        if metrics is not None:
            metrics(logits.detach(), target)
            self.log_dict(metrics, on_step=stage == "train", on_epoch=True, batch_size=batch_size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss of one batch; Lightning's backward streams the trunk's gradients."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss and metrics of one validation batch."""
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss and metrics of one test batch."""
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int,
                     dataloader_idx: int = 0) -> Tensor | tuple[Tensor, Tensor]:
        """Logits of a batch (``image``, ``(image, ...)`` or a slide sample), and its feature map if asked for."""
        image = _image_and_target(batch)[0]
        feature_map = self.forward_streaming(image)
        logits = self.forward_head(feature_map)
        return (logits, feature_map) if self.predict_feature_map else logits

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A slide sample stays on the host, where the engine reads its tiles from (moving each
        tile to the device); its label moves. Other batches move as Lightning moves them."""
        if _is_slide_sample(batch):
            return dataclasses.replace(batch, label=batch.label.to(device))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with learning rate ``lr`` over the parameters that require gradients."""
        return torch.optim.Adam(self.get_trainable_params(), lr=self.lr)


def _check_task_arguments(head: Any, loss_fn: Any, lr: Any) -> None:
    """Refuse a head, loss or learning rate of the wrong kind at construction, not at the first step."""
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module (feature map to logits), got {type(head).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(logits, target), got {loss_fn!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def _image_and_target(batch: Any) -> tuple[Any, Tensor | None]:
    """``(image, target)`` of a batch: ``(image, target, ...)``, a slide sample (its 0-d label
    becomes a batch of one), or an image alone (no target)."""
    if _is_slide_sample(batch):
        return batch.image, batch.label.reshape(1)
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def _is_slide_sample(batch: Any) -> bool:
    """A :class:`~lightstream.data.SlideSample` or a dataclass like it (``image`` and ``label``)."""
    return dataclasses.is_dataclass(batch) and hasattr(batch, "image") and hasattr(batch, "label")
