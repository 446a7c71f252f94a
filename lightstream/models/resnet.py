"""Streaming ResNets (and ResNeXt / Wide ResNet) from torchvision."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import ResNet, WeightsEnum

from ..modules import ImageClassifier
from ..modules.classifier import MetricsArg
from ._torchvision import build_backbone, split_layers

__all__ = ["RESNET_NAMES", "StreamingResNet", "split_resnet"]

RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
"""The torchvision builders :class:`StreamingResNet` accepts as ``model_name``."""


def split_resnet(network: ResNet, last_trunk_layer: str = "layer4") -> tuple[nn.Sequential, nn.Sequential]:
    """Split a torchvision ResNet into ``(trunk, head)`` after ``last_trunk_layer``.

    Layers, in order: ``conv1 bn1 relu maxpool layer1 layer2 layer3 layer4 avgpool flatten fc``;
    submodule names match torchvision's, so state-dict keys do too. Cutting at ``avgpool`` or
    later puts global pooling in the trunk, which the engine refuses when it is streamed.
    """
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    layers = [(name, getattr(network, name)) for name in names]
    return split_layers([*layers, ("flatten", nn.Flatten(1)), ("fc", network.fc)], last_trunk_layer)


class StreamingResNet(ImageClassifier):
    """A torchvision ResNet whose convolutional layers are streamed; pooling and ``fc`` form the head.

    Args:
        model_name: one of :data:`RESNET_NAMES`.
        tile_size: tile height and width in image pixels, at least the trunk's receptive field
            (up to ``layer4``: 435 px for resnet18, 899 for resnet34, 427 for resnet50).
        loss_fn, train_streaming_layers, metrics: as in :class:`~lightstream.modules.ImageClassifier`.
        num_classes: outputs of ``fc`` (a new ``fc`` replaces the pretrained one when it differs).
        weights: ``None`` (random initialisation) or torchvision weights (enum or name such as
            ``"DEFAULT"``); they also set the default ``mean``/``std`` normalisation.
        last_trunk_layer: where the streamed trunk ends (see :func:`split_resnet`).
        **kwargs: to :class:`~lightstream.modules.ImageClassifier` (``lr``, ``mean``, ``std``...).

    The trunk's BatchNorm layers stay in eval mode (their affine parameters still train).

    The constructor's arguments (but ``loss_fn`` and ``metrics``) are saved as hyperparameters:
    ``StreamingResNet.load_from_checkpoint(path)`` rebuilds the model (add ``weights=None`` to skip
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
        last_trunk_layer: str = "layer4",
        **kwargs: Any,
    ) -> None:
        backbone = build_backbone(model_name, RESNET_NAMES, split_resnet, "fc", weights=weights,
                                  num_classes=num_classes, last_trunk_layer=last_trunk_layer, options=kwargs)
        super().__init__(backbone.trunk, backbone.head, tile_size, loss_fn, train_streaming_layers, metrics,
                         **backbone.options)
        self.save_hyperparameters(ignore=["loss_fn", "metrics"])  # load_from_checkpoint(path) rebuilds it
