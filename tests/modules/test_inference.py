"""Slide inference: scores, feature map and a saliency map equal to the whole-image gradient."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lightstream.data import open_slide, slide_heatmap, write_synthetic_slide
from lightstream.modules import ImageClassifier, predict_slide
from lightstream.viz import plot_heatmap_overlay
from tests.conftest import relative_error


def _classifier() -> ImageClassifier:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return ImageClassifier(trunk.double(), head.double(), tile_size=40, mean=[128.0] * 3, std=[64.0] * 3)


def test_predict_slide_streams_from_disk_and_saliency_equals_whole_image_gradient(tmp_path) -> None:
    written = write_synthetic_slide(tmp_path / "s.tif", size=(160, 192), lesions=1, seed=1, compression="zlib")
    model = _classifier()
    with open_slide(written.path, level=0) as slide:
        prediction = predict_slide(model, slide, saliency=True, target=1)
        assert all(p.grad is None for p in model.parameters())  # saliency touches no parameter grads
        assert len(model.stream_network.plan(slide.shape)) > 4
        pixels = slide.read(slice(0, slide.shape[2]), slice(0, slide.shape[3])).double().requires_grad_()
        normalised = (pixels - 128.0) / 64.0
        logits = model.head(model.stream_network.stream_module(normalised))[0]
        logits[1].backward()
        assert relative_error(prediction.logits, logits.detach()) <= 1e-12
        assert torch.allclose(prediction.scores.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert relative_error(prediction.saliency, pixels.grad[0]) <= 1e-10
        thumbnail, heatmap = slide_heatmap(prediction.feature_map, slide, prediction.output_stride[0],
                                           thumbnail_size=64)
    figure = plot_heatmap_overlay(thumbnail, heatmap, title="activation")
    assert heatmap.shape == thumbnail.shape[:2] and np.isfinite(heatmap).any()
    assert len(figure.axes[0].images) == 2
