"""Slide-level heads over a stitched feature map, and the per-slide output their models predict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

__all__ = ["PooledLinearHead", "SlideOutput"]


@dataclass
class SlideOutput:
    """What a slide model's ``predict_step`` returns for a batch.

    Attributes:
        logits: ``[B, classes]``.
        heatmap: ``[B, h, w]``, one value per feature-map cell (e.g. attention, class score).
        heatmap_kind: what ``heatmap`` shows, for titles and file names (``"attention"``...).
        output_stride: image pixels per feature-map cell, ``(rows, cols)``.
    """

    logits: Tensor
    heatmap: Tensor
    heatmap_kind: str
    output_stride: tuple[int, int]


class PooledLinearHead(nn.Module):
    """Global max or average pooling over the feature map, then a linear layer to class logits.

    Args:
        in_channels: channels of the feature map.
        num_classes: outputs.
        pooling: ``"max"`` (a small lesion decides the slide) or ``"avg"``.
    """

    def __init__(self, in_channels: int, num_classes: int, pooling: Literal["max", "avg"] = "max") -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.pooling = pooling
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, feature_map: Tensor) -> Tensor:
        """Logits ``[B, classes]`` of a ``[B, C, h, w]`` feature map."""
        pooled = feature_map.amax((2, 3)) if self.pooling == "max" else feature_map.mean((2, 3))
        return self.linear(pooled)

    def score_map(self, feature_map: Tensor) -> Tensor:
        """Class logits of every feature-map cell, ``[B, classes, h, w]`` (a class activation map).

        With ``"avg"`` pooling their spatial mean is exactly :meth:`forward`'s logits.
        """
        return self.linear(feature_map.movedim(1, -1)).movedim(-1, 1)
