"""Rectangles of slide pixels and their alignment to the engine's output stride.

Rectangles are the engine's :class:`lightstream.core.geometry.Box` (half-open
``rows [top, bottom) x cols [left, right)``), so a box from tissue detection and a tile box of
the engine are the same type.
"""

from __future__ import annotations

import math

from lightstream.core.geometry import Box

__all__ = [
    "Box",
    "scale_box",
    "clip_box",
    "round_up_to_multiple",
    "round_down_to_multiple",
    "fit_box_to_multiple",
]


def scale_box(box: Box, scale_y: float, scale_x: float) -> Box:
    """``box`` in a frame whose coordinates are ``scale`` times these, rounded outwards to whole pixels."""
    return Box(
        math.floor(box.top * scale_y),
        math.floor(box.left * scale_x),
        math.ceil(box.bottom * scale_y),
        math.ceil(box.right * scale_x),
    )


def clip_box(box: Box, height: int, width: int) -> Box:
    """The part of ``box`` inside an image of ``height x width`` (possibly empty, never inverted)."""
    top, left = min(max(box.top, 0), height), min(max(box.left, 0), width)
    return Box(top, left, min(max(box.bottom, top), height), min(max(box.right, left), width))


def round_up_to_multiple(size: int, stride: int) -> int:
    """The smallest multiple of ``stride`` that is ``>= size``."""
    _check_stride(stride)
    return -(-size // stride) * stride


def round_down_to_multiple(size: int, stride: int) -> int:
    """The largest multiple of ``stride`` that is ``<= size``."""
    _check_stride(stride)
    return size // stride * stride


def fit_box_to_multiple(box: Box, stride: int, bounds: tuple[int, int]) -> Box:
    """Grow ``box`` so its height and width are multiples of ``stride``, keeping it inside ``bounds``.

    The box grows evenly on both sides and is then shifted back inside the image
    ``bounds = (height, width)``. Where the image itself is smaller than the grown box, the box
    starts at 0 and reaches past the bottom/right edge; a :class:`~lightstream.data.views.CropView`
    fills that part with its ``fill`` value.
    """
    height, width = round_up_to_multiple(box.height, stride), round_up_to_multiple(box.width, stride)
    top = _fit_start(box.top, box.height, height, bounds[0])
    left = _fit_start(box.left, box.width, width, bounds[1])
    return Box(top, left, top + height, left + width)


def _fit_start(start: int, length: int, grown: int, limit: int) -> int:
    start -= (grown - length) // 2
    return max(0, min(start, limit - grown))


def _check_stride(stride: int) -> None:
    if stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
