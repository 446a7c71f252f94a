"""Errors raised at the boundary of the streaming engine, each naming what to change."""

from __future__ import annotations

__all__ = ["StreamingError", "UnsupportedLayerError", "TileTooSmallError"]


class StreamingError(Exception):
    """Base class of every error lightstream raises about a trunk or a tile configuration."""


class UnsupportedLayerError(StreamingError, TypeError):
    """A layer in the streamed trunk is not local (its output at a pixel depends on far pixels).

    Attributes:
        path: dotted module path (or graph node) of the offending layer.
        reason: why it cannot be streamed exactly, and what to do instead.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot stream layer '{path}': {reason}")


class TileTooSmallError(StreamingError, ValueError):
    """The tile cannot hold the receptive field of even one output pixel.

    Attributes:
        tile_size: the requested tile size ``(height, width)``.
        minimum: the smallest tile ``(height, width)`` that works for this trunk.
    """

    def __init__(self, tile_size: tuple[int, int], minimum: tuple[int, int]) -> None:
        self.tile_size = tile_size
        self.minimum = minimum
        super().__init__(
            f"tile of {tile_size[0]}x{tile_size[1]} px is too small for this trunk: one output pixel "
            f"needs {minimum[0]}x{minimum[1]} input px (its receptive field); the smallest tile that "
            f"works is {max(minimum)} px"
        )
