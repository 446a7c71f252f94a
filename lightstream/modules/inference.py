"""Inference over a whole slide (or any large image): class scores, feature map, saliency."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightstream.core import ImageSource

from .classifier import ImageClassifier

__all__ = ["SlidePrediction", "predict_slide"]


@dataclass
class SlidePrediction:
    """What :func:`predict_slide` returns for one image.

    Attributes:
        logits: ``[num_classes]`` head outputs.
        scores: ``[num_classes]`` softmax probabilities.
        target: the class the saliency map explains.
        feature_map: ``[C, h, w]`` stitched trunk output (one cell per ``output_stride`` pixels).
        saliency: ``[C_in, H, W]`` gradient of the target's logit with respect to the image,
            or ``None`` when not requested.
        output_stride: image pixels per feature-map cell, ``(rows, cols)``.
    """

    logits: Tensor
    scores: Tensor
    target: int
    feature_map: Tensor
    saliency: Tensor | None
    output_stride: tuple[int, int]


def predict_slide(model: ImageClassifier, image: Tensor | ImageSource, saliency: bool = False,
                  target: int | None = None) -> SlidePrediction:
    """Classify one ``[1, C, H, W]`` image or lazy slide with a streaming classifier.

    The trunk is streamed tile by tile (a slide is read from disk on demand). With
    ``saliency=True`` the logit of ``target`` (default: the predicted class) is backpropagated
    to the image by the streamed backward, without touching parameter gradients; that map has
    the image's full size, so use it on a level that fits in host memory.
    Place either map on a thumbnail with :func:`lightstream.data.slide_heatmap` and draw it with
    :func:`lightstream.viz.plot_heatmap_overlay`.

    Raises:
        ValueError: ``image`` is a batch of more than one image (call it once per image), or
            ``target`` is not a class index.
        TypeError: ``model`` is not an :class:`ImageClassifier`.
    """
    _check_prediction_arguments(model, image)
    engine = model.stream_network
    model.eval()
    with torch.set_grad_enabled(saliency):
        feature_map = engine(image)
        if saliency:
            feature_map.requires_grad_()
        logits = model.forward_head(feature_map)[0]
        chosen = int(logits.argmax()) if target is None else _checked_target(target, logits.shape[0])
        image_grad = None
        if saliency:
            (grad,) = torch.autograd.grad(logits[chosen], feature_map)
            image_grad = engine.input_gradient(image, grad)[0]
    return SlidePrediction(logits.detach(), logits.detach().softmax(-1), chosen, feature_map.detach()[0],
                           image_grad, engine.output_stride)


def _check_prediction_arguments(model: Any, image: Any) -> None:
    """Refuse a model that is not a streaming classifier, and a batch of more than one image.

    One image at a time: the logits, maps and saliency describe one slide, and a batch would
    be a list of them (call :func:`predict_slide` per image instead).
    """
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"predict_slide needs an ImageClassifier (a streamed trunk and a head), got "
                        f"{type(model).__name__}")
    if not hasattr(image, "shape"):
        raise TypeError(f"image must be a [1, C, H, W] tensor or an image source, got {type(image).__name__}")
    shape = tuple(image.shape)
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"predict_slide takes one image of shape [1, C, H, W], got shape {list(shape)}: call "
                         "it once per image (predict_slide(model, images[i:i + 1]))")


def _checked_target(target: Any, classes: int) -> int:
    """``target`` as a class index in ``[0, classes)``; anything else is refused."""
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target < classes:
        raise ValueError(f"target must be a class index in 0..{classes - 1}, got {target!r}")
    return int(target)
