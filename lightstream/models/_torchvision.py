"""Shared plumbing of the ready backbones: build a torchvision classifier, split it, set the head.

Every backbone's constructor is :func:`build_backbone` with its own names, split and classifier
layer, then ``ImageClassifier.__init__`` and ``save_hyperparameters`` (which reads the
constructor's own arguments, so it stays in each constructor).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum, get_model_builder, get_model_weights

logger = logging.getLogger(__name__)

Layers = Sequence[tuple[str, nn.Module]]
Split = Callable[[Any, Any], tuple[nn.Sequential, nn.Sequential]]
"""``split(network, last_trunk_layer) -> (trunk, head)``, e.g. :func:`~lightstream.models.split_resnet`."""


@dataclass(frozen=True)
class Backbone:
    """A torchvision classifier cut into a streamed trunk and a head, and its classifier's options."""

    trunk: nn.Sequential
    head: nn.Sequential
    options: dict[str, Any]
    """The ``ImageClassifier`` keyword options, with the pretrained weights' ``mean``/``std`` added."""


def build_backbone(model_name: str, names: Sequence[str], split: Split, classifier: str, *,
                   weights: WeightsEnum | str | None, num_classes: int, last_trunk_layer: Any,
                   options: dict[str, Any], **model_kwargs: Any) -> Backbone:
    """Build torchvision's ``model_name`` with ``num_classes`` outputs and split it for streaming.

    Args:
        model_name: a torchvision builder, one of ``names``.
        names: the builders the backbone accepts.
        split: cuts the network into ``(trunk, head)`` after ``last_trunk_layer``.
        classifier: dotted path of the final ``nn.Linear`` (``"fc"``, ``"classifier.2"``), replaced
            when pretrained weights come with another number of classes.
        weights, num_classes, last_trunk_layer: the backbone's arguments of those names.
        options: the remaining keyword arguments of the backbone, for ``ImageClassifier``.
        **model_kwargs: to the torchvision builder.

    Raises:
        ValueError: ``model_name`` is not one of ``names``, or ``num_classes`` is not a positive integer.
    """
    if model_name not in names:
        raise ValueError(f"model_name must be one of {tuple(names)}, got {model_name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    network, resolved = build_network(model_name, weights, num_classes, **model_kwargs)
    parent_name, _, child = classifier.rpartition(".")
    parent = network.get_submodule(parent_name)
    setattr(parent, child, classifier_for(getattr(parent, child), num_classes))
    trunk, head = split(network, last_trunk_layer)
    return Backbone(trunk, head, normalization_defaults(resolved, options))


def build_network(model_name: str, weights: WeightsEnum | str | None, num_classes: int, **model_kwargs: Any
                  ) -> tuple[nn.Module, WeightsEnum | None]:
    """Build torchvision's ``model_name``; with ``weights`` its pretrained weights are loaded.

    ``weights`` is a torchvision weights enum or its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``);
    torchvision downloads it to the torch hub cache the first time. Without weights the network
    gets ``num_classes`` outputs; with them it keeps the pretrained classifier, which the caller
    replaces with :func:`classifier_for`. Returns the network and the resolved weights.
    """
    builder = get_model_builder(model_name)
    if weights is None:
        return builder(weights=None, num_classes=num_classes, **model_kwargs), None
    resolved = get_model_weights(model_name).verify(weights)
    logger.info("loading %s weights %s", model_name, resolved)
    return builder(weights=resolved, **model_kwargs), resolved


def classifier_for(linear: nn.Linear, num_classes: int) -> nn.Linear:
    """``linear`` itself when it already has ``num_classes`` outputs, else a new one."""
    if linear.out_features == num_classes:
        return linear
    return nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None)


def split_layers(layers: Layers, last_trunk_layer: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut a sequence of named layers after ``last_trunk_layer``: ``(trunk, head)``.

    Raises:
        ValueError: when ``last_trunk_layer`` names no layer (the message lists the names).
    """
    names = [name for name, _ in layers]
    if last_trunk_layer not in names:
        raise ValueError(f"last_trunk_layer must be one of {names}, got {last_trunk_layer!r}")
    cut = names.index(last_trunk_layer) + 1
    return nn.Sequential(OrderedDict(layers[:cut])), nn.Sequential(OrderedDict(layers[cut:]))


def normalization_defaults(weights: WeightsEnum | None, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the pretrained weights' ``mean`` / ``std`` added where not given.

    They are the weights' own preprocessing statistics, for float images scaled to [0, 1];
    for ``uint8`` images pass ``mean`` and ``std`` multiplied by 255.
    """
    if weights is None:
        return options
    preprocessing = weights.transforms()
    return {"mean": list(preprocessing.mean), "std": list(preprocessing.std), **options}
