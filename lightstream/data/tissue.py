"""Tissue detection on a low-resolution thumbnail: Otsu's threshold on HSV saturation (numpy only)."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np

from lightstream.data.geometry import Box, clip_box
from lightstream.data.slide import Slide

__all__ = ["TissueMask", "otsu_threshold", "saturation", "tissue_mask", "mask_box", "detect_tissue", "tissue_box",
           "check_margin"]

logger = logging.getLogger(__name__)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an RGB array ``[..., 3]``, in ``[0, 1]`` (0 for black)."""
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in ``[0, 1]``: the cut maximising the between-class variance.

    Where several cuts tie (an empty gap between two modes), the middle of the gap is returned.
    """
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros_like(sum_low), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros_like(sum_low), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # Every cut in an empty gap between the modes is optimal; take the middle of that plateau.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.05, smoothing: int = 5) -> tuple[np.ndarray, float]:
    """Tissue pixels of a low-resolution RGB image ``[h, w, 3]``, and the saturation threshold used.

    A pixel is tissue if its saturation exceeds Otsu's threshold (at least ``min_saturation``, so a
    blank slide yields no tissue rather than half its noise) and most of its
    ``smoothing x smoothing`` neighbourhood is too, which drops isolated specks.
    """
    _check_fraction(min_saturation, "min_saturation")
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Integral) or smoothing < 1:
        raise ValueError(f"smoothing must be a positive integer (a window side in pixels), got {smoothing!r}")
    values = saturation(rgb)
    threshold = max(otsu_threshold(values), min_saturation)
    mask = values > threshold
    if smoothing > 1:
        mask = _majority(mask, smoothing)
    return mask, threshold


@dataclass(frozen=True)
class TissueMask:
    """Tissue found on a slide thumbnail.

    Attributes:
        mask: boolean ``[h, w]``; ``True`` is tissue.
        threshold: the saturation threshold that separated tissue from glass.
        slide_shape: ``(height, width)`` of the slide's level 0 that the mask spans.
    """

    mask: np.ndarray
    threshold: float
    slide_shape: tuple[int, int]

    def box(self, level_shape: tuple[int, int], margin: int = 0) -> Box | None:
        """Bounding box of the tissue in the pixels of a level of shape ``level_shape``, or ``None``.

        ``margin`` (level pixels) widens the box on every side, clipped to the level.
        """
        return mask_box(self.mask, level_shape, margin)


def mask_box(mask: np.ndarray, level_shape: tuple[int, int], margin: int = 0) -> Box | None:
    """Bounding box of the non-zero pixels of a low-resolution ``mask`` in the pixels of a level.

    The mask spans the whole level; ``margin`` (level pixels) widens the box on every side,
    clipped to the level. ``None`` if the mask is empty.

    Raises:
        ValueError: ``margin`` is not a non-negative integer.
    """
    check_margin(margin)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    scale_y = level_shape[0] / mask.shape[0]
    scale_x = level_shape[1] / mask.shape[1]
    top = math.floor(rows[0] * scale_y) - margin
    left = math.floor(cols[0] * scale_x) - margin
    bottom = math.ceil((rows[-1] + 1) * scale_y) + margin
    right = math.ceil((cols[-1] + 1) * scale_x) + margin
    return clip_box(Box(top, left, bottom, right), *level_shape)


def detect_tissue(slide: Slide, max_size: int = 1024, min_saturation: float = 0.05) -> TissueMask:
    """Detect tissue on the slide's thumbnail (longer side ``max_size``); see :func:`tissue_mask`."""
    _check_fraction(min_saturation, "min_saturation")  # before the thumbnail is read
    mask, threshold = tissue_mask(slide.thumbnail(max_size), min_saturation)
    return TissueMask(mask, threshold, slide.level_shapes[0])


def tissue_box(slide: Slide, margin: int = 0, max_size: int = 1024, min_saturation: float = 0.05) -> Box | None:
    """Bounding box of the tissue in the slide's chosen level, or ``None`` if it finds no tissue."""
    check_margin(margin)  # before the thumbnail is read
    box = detect_tissue(slide, max_size, min_saturation).box(slide.shape[2:], margin)
    if box is None:
        logger.warning("%s: found no tissue (saturation never above %.3f)", slide.path, min_saturation)
    return box


def check_margin(margin: object, name: str = "margin") -> None:
    """Refuse a tissue margin that is not a whole, non-negative number of pixels (``name`` is the
    argument it came in as, for the message)."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Integral) or margin < 0:
        raise ValueError(f"{name} must be a non-negative integer (pixels added around the tissue box), "
                         f"got {margin!r}")


def _check_fraction(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")


def _majority(mask: np.ndarray, size: int) -> np.ndarray:
    """``True`` where more than half of the ``size x size`` window around a pixel is ``True``."""
    half = size // 2
    padded = np.pad(mask.astype(np.int32), half)
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = mask.shape
    window = (
        integral[size : size + height, size : size + width]
        - integral[:height, size : size + width]
        - integral[size : size + height, :width]
        + integral[:height, :width]
    )
    return window * 2 > size * size
