"""Streaming ConvNeXts from torchvision."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import ConvNeXt, WeightsEnum

from ..modules import ImageClassifier
from ..modules.classifier import MetricsArg
from ._torchvision import build_split_classifier, split_layers

__all__ = ["CONVNEXT_NAMES", "StreamingConvNext", "split_convnext"]

CONVNEXT_NAMES = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
"""The torchvision builders :class:`StreamingConvNext` accepts as ``model_name``."""


def split_convnext(network: ConvNeXt, last_trunk_layer: str | int | None = None
                   ) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a torchvision ConvNeXt into ``(trunk, head)`` after ``last_trunk_layer``.

    Layers, in order: the blocks of ``features`` (named ``"0"`` to ``"7"``, so the trunk is
    ``features`` itself, a flat sequence that ``stages="auto"`` can cut), then ``avgpool`` and
    ``classifier``. ``None`` ends the trunk after the last block; a block index ends it
    earlier; ``avgpool`` or later puts global pooling in the trunk, which the engine refuses.
    """
    layers = [*network.features.named_children(), ("avgpool", network.avgpool), ("classifier", network.classifier)]
    last = len(network.features) - 1 if last_trunk_layer is None else last_trunk_layer
    return split_layers(layers, str(last))


class StreamingConvNext(ImageClassifier):
    """A torchvision ConvNeXt with its ``features`` streamed; pooling and classifier form the head.

    The trunk's state-dict keys are those of torchvision's ``features`` (``0.0.weight`` is
    torchvision's ``features.0.0.weight``); see :func:`split_convnext` for ``last_trunk_layer``.

    Stochastic depth is built with probability 0: it drops residual branches at random per
    sample, and the backward's recomputation of a tile would draw different drops than its
    forward did, so it cannot be streamed in training. Its channel LayerNorms are per pixel
    and stream exactly in training mode.

    Args:
        model_name: one of :data:`CONVNEXT_NAMES`. The receptive field of ``features``, the
            smallest tile, is 1688 px for tiny and 3416 px for the others.
        tile_size, loss_fn, train_streaming_layers, metrics, num_classes, weights, last_trunk_layer, **kwargs:
            as in :class:`~lightstream.models.StreamingResNet`.

    The constructor's arguments (but ``loss_fn`` and ``metrics``) are saved as hyperparameters:
    ``StreamingConvNext.load_from_checkpoint(path)`` rebuilds the model (add ``weights=None`` to skip
    downloading pretrained weights that the checkpoint replaces anyway).
    """

    def __init__(
        self,
        model_name: str,
        tile_size: int | tuple[int, int],
        loss_fn: nn.Module | None = None,
        train_streaming_layers: bool = True,
        metrics: MetricsArg = None,
        *,
        num_classes: int = 1000,
        weights: WeightsEnum | str | None = None,
        last_trunk_layer: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        backbone = build_split_classifier(model_name, CONVNEXT_NAMES, split_convnext, "classifier.2", weights=weights,
                                  num_classes=num_classes, last_trunk_layer=last_trunk_layer, options=kwargs,
                                  stochastic_depth_prob=0.0)
        super().__init__(backbone.trunk, backbone.head, tile_size, loss_fn, train_streaming_layers, metrics,
                         **backbone.options)
        self.save_hyperparameters(ignore=["loss_fn", "metrics"])  # load_from_checkpoint(path) rebuilds it
