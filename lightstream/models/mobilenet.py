"""Streaming MobileNetV2 from torchvision: the light backbone."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import MobileNetV2, WeightsEnum

from ..modules import ImageClassifier
from ..modules.classifier import MetricsArg
from ._torchvision import build_backbone, split_layers

__all__ = ["StreamingMobileNetV2", "split_mobilenet_v2"]


def split_mobilenet_v2(network: MobileNetV2, last_trunk_layer: str | int | None = None
                       ) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a torchvision MobileNetV2 into ``(trunk, head)`` after ``last_trunk_layer``.

    Layers, in order: the blocks of ``features`` (named ``"0"`` to ``"18"``, so the trunk is
    ``features`` itself, which ``stages="auto"`` can cut), then ``avgpool`` and ``flatten``
    (functional in torchvision's ``forward``, modules here) and ``classifier``. ``None`` ends
    the trunk after the last block; ``avgpool`` or later is refused by the engine.
    """
    layers = [*network.features.named_children(), ("avgpool", nn.AdaptiveAvgPool2d(1)),
              ("flatten", nn.Flatten(1)), ("classifier", network.classifier)]
    last = len(network.features) - 1 if last_trunk_layer is None else last_trunk_layer
    return split_layers(layers, str(last))


class StreamingMobileNetV2(ImageClassifier):
    """torchvision's MobileNetV2 with ``features`` streamed (receptive field 491 px).

    The trunk's BatchNorm layers stay in eval mode (their affine parameters still train); the
    head's dropout is unaffected. The trunk's state-dict keys are those of torchvision's
    ``features``; see :func:`split_mobilenet_v2` for ``last_trunk_layer``. Other arguments as in
    :class:`~lightstream.models.StreamingResNet`, without ``model_name``.

    The constructor's arguments (but ``loss_fn`` and ``metrics``) are saved as hyperparameters:
    ``StreamingMobileNetV2.load_from_checkpoint(path)`` rebuilds the model (add ``weights=None``
    to skip downloading pretrained weights that the checkpoint replaces anyway).
    """

    def __init__(
        self,
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
        backbone = build_backbone("mobilenet_v2", ("mobilenet_v2",), split_mobilenet_v2, "classifier.1",
                                  weights=weights, num_classes=num_classes, last_trunk_layer=last_trunk_layer,
                                  options=kwargs)
        super().__init__(backbone.trunk, backbone.head, tile_size, loss_fn, train_streaming_layers, metrics,
                         **backbone.options)
        self.save_hyperparameters(ignore=["loss_fn", "metrics"])  # load_from_checkpoint(path) rebuilds it
