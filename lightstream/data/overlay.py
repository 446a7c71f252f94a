"""A label mask over a slide thumbnail: array math and a PNG (the matplotlib figure is in ``lightstream.viz``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lightstream.data.masks import LabelMask
from lightstream.data.slide import Slide, open_slide

__all__ = ["LABEL_COLORS", "label_colors", "labels_on_thumbnail", "blend_labels", "write_overlay_png"]

LABEL_COLORS = np.array(
    [
        [0, 0, 0],
        [214, 39, 40],
        [31, 119, 180],
        [44, 160, 44],
        [255, 127, 14],
        [148, 103, 189],
        [23, 190, 207],
        [227, 119, 194],
        [188, 189, 34],
        [140, 86, 75],
    ],
    dtype=np.uint8,
)
"""RGB colour of labels 0..9 (label ``k`` beyond uses ``LABEL_COLORS[1 + (k - 1) % 9]``); 0 is background."""


def label_colors(labels: np.ndarray | int) -> np.ndarray:
    """RGB ``uint8`` of each label (``[..., 3]``) from :data:`LABEL_COLORS`, cycling labels past 9."""
    index = np.asarray(labels, dtype=np.int64)
    index = np.where(index < len(LABEL_COLORS), index, 1 + (index - 1) % (len(LABEL_COLORS) - 1))
    return LABEL_COLORS[index]


def labels_on_thumbnail(mask: str | Path | LabelMask, thumbnail_shape: tuple[int, int]) -> np.ndarray:
    """The label mask sampled on a thumbnail's pixel grid (nearest neighbour), as ``[h, w]``.

    ``mask`` is a mask file or an open :class:`~lightstream.data.LabelMask` (only its path is used):
    it is read afresh on the thumbnail's grid, from its coarsest level that is fine enough.
    """
    with LabelMask(mask.path if isinstance(mask, LabelMask) else mask, thumbnail_shape) as on_thumbnail:
        return on_thumbnail.read(slice(None), slice(None))[0, 0].numpy()


def blend_labels(
    thumbnail: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    colors: np.ndarray | None = None,
    background: int | None = 0,
) -> np.ndarray:
    """``thumbnail`` (RGB ``uint8 [h, w, 3]``) with each labelled pixel tinted by its label's colour.

    Args:
        labels: ``[h, w]`` class indices on the thumbnail's grid (:func:`labels_on_thumbnail`).
        alpha: opacity of the colours.
        colors: ``[n, 3]`` RGB per label (default :data:`LABEL_COLORS`, cycled past 9).
        background: label left untinted (``None`` tints every label).
    """
    if labels.shape != thumbnail.shape[:2]:
        raise ValueError(f"labels {labels.shape} and thumbnail {thumbnail.shape[:2]} differ in size")
    if colors is None:
        tint = label_colors(labels)
    else:
        palette = np.asarray(colors, dtype=np.uint8)
        if labels.size and labels.max() >= len(palette):
            raise ValueError(f"labels go up to {labels.max()} but only {len(palette)} colours were given")
        tint = palette[labels.astype(np.int64)]
    tint = tint.astype(np.float32)
    weight = np.full(labels.shape, alpha, dtype=np.float32)
    if background is not None:
        weight[labels == background] = 0
    blended = thumbnail[..., :3].astype(np.float32) * (1 - weight[..., None]) + tint * weight[..., None]
    return np.rint(blended).astype(np.uint8)


def write_overlay_png(
    png_path: str | Path,
    slide: str | Path | Slide,
    mask: str | Path | LabelMask,
    max_size: int = 1024,
    alpha: float = 0.5,
) -> Path:
    """Save the slide's thumbnail with ``mask`` over it (:func:`blend_labels`) as a PNG; returns its path."""
    png_path = Path(png_path)
    if isinstance(slide, Slide):
        thumbnail = slide.thumbnail(max_size)
    else:
        with open_slide(slide) as opened:
            thumbnail = opened.thumbnail(max_size)
    overlay = blend_labels(thumbnail, labels_on_thumbnail(mask, thumbnail.shape[:2]), alpha)
    Image.fromarray(overlay).save(png_path)
    return png_path
