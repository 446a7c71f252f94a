"""Errors raised at the boundary of the streaming engine, each naming what to change."""

from __future__ import annotations

__all__ = ["StreamingError", "UnsupportedLayerError", "TileTooSmallError", "ImageSizeError"]


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


class ImageSizeError(StreamingError, ValueError):
    """The whole network cannot run on an image of this size: a merge meets maps of different sizes.

    A U-Net concatenates each upsampled map with the encoder's map of its level; on an image
    whose sides the downsampling does not divide evenly the two differ by a pixel, and the whole
    network fails. Tiles crop merged maps to their common region, so they would run and silently
    give a smaller output misaligned with the image: the size is refused instead.

    Attributes:
        path: the merging layer.
        image_size: the image's ``(height, width)``.
        operands: the merged maps' ``(path, (height, width))`` at that image size.
        suggestion: the nearest larger ``(height, width)`` on which every merge meets equal maps.
    """

    def __init__(self, path: str, image_size: tuple[int, int], operands: list[tuple[str, tuple[int, int]]],
                 suggestion: tuple[int, int]) -> None:
        self.path = path
        self.image_size = image_size
        self.operands = operands
        self.suggestion = suggestion
        maps = " and ".join(f"{h}x{w} ('{name}')" for name, (h, w) in operands)
        super().__init__(
            f"the network cannot run on a {image_size[0]}x{image_size[1]} image: '{path}' merges maps of {maps}, "
            "so the whole network fails here and streamed tiles would give a smaller output misaligned with "
            f"the image; pad or crop the image to a size the downsampling divides evenly, e.g. "
            f"{suggestion[0]}x{suggestion[1]}"
        )
