"""Lazy views over an :class:`~lightstream.core.source.ImageSource`: crop/pad, flips, rotations, colour.

Each view is itself an ``ImageSource``: it maps a requested rectangle to the rectangle of the
underlying source, reads only that, and transforms the tile. No view ever loads the whole image,
and every view is a pure function of pixel coordinates, so the pixels of a rectangle do not depend
on which tile asked for them and are the same on every read (the engine reads each tile twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lightstream.core.source import ImageSource, TensorSource
from lightstream.data.geometry import Box, clip_box, round_down_to_multiple, round_up_to_multiple

__all__ = [
    "CropView",
    "FlipView",
    "Rot90View",
    "ColorJitter",
    "ColorJitterView",
    "pad_to_multiple",
    "crop_to_multiple",
    "source_thumbnail",
]

WHITE = 255
"""Fill value for pixels outside a brightfield slide (white glass, as uint8)."""


MAX_THUMBNAIL_ZOOM = 8
"""A crop's thumbnail asks its source for at most this many times the requested size."""


def source_thumbnail(source: ImageSource, max_size: int) -> np.ndarray:
    """``source`` as an ``[h, w, C]`` array whose longer side is at most ``max_size``.

    Uses the source's own ``thumbnail`` (a slide, a view over one) or, for a tensor in memory,
    its strided pixels; values keep the source's scale (``uint8`` or float on 0..255).
    """
    if callable(getattr(source, "thumbnail", None)):
        return np.asarray(source.thumbnail(max_size))  # type: ignore[attr-defined]
    if isinstance(source, TensorSource):
        image = source.image[0]
        step = max(1, -(-max(image.shape[-2:]) // max_size))
        return image[:, ::step, ::step].permute(1, 2, 0).cpu().numpy()
    raise TypeError(f"cannot draw a {type(source).__name__}: it has no thumbnail(max_size) and is not in memory")


def slice_span(index: slice, length: int) -> tuple[int, int]:
    """``(start, stop)`` of a unit-step slice over ``length`` items, clamped like tensor slicing."""
    start, stop, step = index.indices(length)
    if step != 1:
        raise ValueError(f"image sources read contiguous rectangles; got a slice with step {step}")
    return start, max(start, stop)


class CropView:
    """The rectangle ``box`` of ``source``; parts of ``box`` outside the source read as ``fill``.

    A box inside the source crops it; a box reaching past its edges pads it, so one view covers
    both cropping to tissue and padding to a multiple of the engine's stride.
    """

    def __init__(self, source: ImageSource, box: Box, fill: float = WHITE) -> None:
        self.source = source
        self.box = box
        self.fill = fill

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, channels, _, _ = self.source.shape
        return batch, channels, self.box.height, self.box.width

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        r0, r1 = slice_span(rows, self.box.height)
        c0, c1 = slice_span(cols, self.box.width)
        wanted = Box(self.box.top + r0, self.box.left + c0, self.box.top + r1, self.box.left + c1)
        _, _, height, width = self.source.shape
        inside = clip_box(wanted, height, width)
        tile = self.source.read(slice(inside.top, inside.bottom), slice(inside.left, inside.right))
        if inside == wanted:
            return tile
        out = torch.full(
            (tile.shape[0], tile.shape[1], wanted.height, wanted.width),
            self.fill,
            dtype=tile.dtype,
            device=tile.device,
        )
        top, left = inside.top - wanted.top, inside.left - wanted.left
        out[:, :, top : top + inside.height, left : left + inside.width] = tile
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The view as an ``[h, w, C]`` array cut from the source's thumbnail, which is fetched
        fine enough for the box (up to ``MAX_THUMBNAIL_ZOOM`` times ``max_size``): the longer
        side is at most ``max_size``, and at least about half of it from a slide. Outside the
        source reads as ``fill``."""
        _, _, height, width = self.source.shape
        zoom = max(height, width) / max(self.box.height, self.box.width, 1)
        full = source_thumbnail(self.source, math.ceil(max_size * min(max(zoom, 1.0), MAX_THUMBNAIL_ZOOM)))
        scale_rows, scale_cols = full.shape[0] / height, full.shape[1] / width
        top, left = math.floor(self.box.top * scale_rows), math.floor(self.box.left * scale_cols)
        bottom = max(top + 1, math.ceil(self.box.bottom * scale_rows))
        right = max(left + 1, math.ceil(self.box.right * scale_cols))
        out = np.full((bottom - top, right - left, *full.shape[2:]), self.fill, dtype=full.dtype)
        inside = clip_box(Box(top, left, bottom, right), full.shape[0], full.shape[1])
        if inside.height > 0 and inside.width > 0:
            out[inside.top - top : inside.bottom - top, inside.left - left : inside.right - left] = full[
                inside.top : inside.bottom, inside.left : inside.right
            ]
        return out


class FlipView:
    """``source`` mirrored left-right (``horizontal``) and/or upside-down (``vertical``)."""

    def __init__(self, source: ImageSource, horizontal: bool = False, vertical: bool = False) -> None:
        self.source = source
        self.horizontal = horizontal
        self.vertical = vertical

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        _, _, height, width = self.source.shape
        r0, r1 = slice_span(rows, height)
        c0, c1 = slice_span(cols, width)
        if self.vertical:
            r0, r1 = height - r1, height - r0
        if self.horizontal:
            c0, c1 = width - c1, width - c0
        tile = self.source.read(slice(r0, r1), slice(c0, c1))
        dims = [d for d, flip in ((2, self.vertical), (3, self.horizontal)) if flip]
        return torch.flip(tile, dims) if dims else tile

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The source's thumbnail (:func:`source_thumbnail`), mirrored like the view."""
        axes = [a for a, flip in ((0, self.vertical), (1, self.horizontal)) if flip]
        image = source_thumbnail(self.source, max_size)
        return np.ascontiguousarray(np.flip(image, axes)) if axes else image


class Rot90View:
    """``source`` rotated by ``k`` quarter turns, exactly as ``torch.rot90(image, k, dims=(2, 3))``."""

    def __init__(self, source: ImageSource, k: int = 1) -> None:
        self.source = source
        self.k = k % 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, channels, height, width = self.source.shape
        return (batch, channels, width, height) if self.k % 2 else (batch, channels, height, width)

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        _, _, height, width = self.source.shape
        _, _, out_height, out_width = self.shape
        r0, r1 = slice_span(rows, out_height)
        c0, c1 = slice_span(cols, out_width)
        # Output pixel (i, j) comes from source pixel:
        #   k=1: (j, W-1-i)    k=2: (H-1-i, W-1-j)    k=3: (H-1-j, i)
        if self.k == 0:
            return self.source.read(slice(r0, r1), slice(c0, c1))
        if self.k == 1:
            tile = self.source.read(slice(c0, c1), slice(width - r1, width - r0))
        elif self.k == 2:
            tile = self.source.read(slice(height - r1, height - r0), slice(width - c1, width - c0))
        else:
            tile = self.source.read(slice(height - c1, height - c0), slice(r0, r1))
        return torch.rot90(tile, self.k, dims=(2, 3))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The source's thumbnail (:func:`source_thumbnail`), rotated like the view."""
        return np.ascontiguousarray(np.rot90(source_thumbnail(self.source, max_size), self.k, axes=(0, 1)))


# RGB -> YIQ (NTSC); hue rotation turns the (I, Q) chroma plane around the luma axis.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = _RGB_TO_YIQ[0]


@dataclass(frozen=True)
class ColorJitter:
    """Fixed colour-jitter parameters for one sample; every factor is applied per pixel.

    Attributes:
        brightness: multiplies intensities (1 = unchanged).
        contrast: scales intensities around mid-grey 127.5 (1 = unchanged). Unlike torchvision,
            the pivot is fixed rather than the image mean, so a tile never depends on other tiles.
        saturation: blends each pixel with its luma (1 = unchanged, 0 = greyscale).
        hue: rotates the chroma plane by this fraction of a full turn (0 = unchanged).
    """

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        brightness: float = 0.1,
        contrast: float = 0.1,
        saturation: float = 0.1,
        hue: float = 0.02,
    ) -> ColorJitter:
        """Draw factors uniformly from ``1 +- brightness`` etc. and a hue shift from ``+- hue``."""
        return cls(
            brightness=float(rng.uniform(1 - brightness, 1 + brightness)),
            contrast=float(rng.uniform(1 - contrast, 1 + contrast)),
            saturation=float(rng.uniform(1 - saturation, 1 + saturation)),
            hue=float(rng.uniform(-hue, hue)),
        )

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix [3, 3], offset [3])`` such that ``rgb_out = matrix @ rgb_in + offset`` (0..255 scale)."""
        contrast_offset = np.full(3, (1 - self.contrast) * 127.5)
        saturate = self.saturation * np.eye(3) + (1 - self.saturation) * np.outer(np.ones(3), _LUMA)
        angle = 2 * math.pi * self.hue
        rotate_chroma = np.array(
            [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
        )
        rotate_hue = np.linalg.inv(_RGB_TO_YIQ) @ rotate_chroma @ _RGB_TO_YIQ
        colour = rotate_hue @ saturate
        matrix = colour * (self.contrast * self.brightness)
        return matrix, colour @ contrast_offset


class ColorJitterView:
    """``source`` with a fixed :class:`ColorJitter` applied to each tile as it is read.

    ``uint8`` tiles stay ``uint8`` (rounded and clipped to 0..255); float tiles stay float, clipped
    to 0..255, i.e. this view expects intensities on the 0..255 scale.
    """

    def __init__(self, source: ImageSource, jitter: ColorJitter) -> None:
        if source.shape[1] != 3:
            raise ValueError(f"colour jitter needs an RGB source (3 channels), got {source.shape[1]}")
        self.source = source
        self.jitter = jitter
        matrix, offset = jitter.affine()
        self._matrix = matrix.tolist()
        self._offset = offset.tolist()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        return self._jitter(self.source.read(rows, cols))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The source's thumbnail (:func:`source_thumbnail`) with the view's colour jitter."""
        image = torch.from_numpy(np.ascontiguousarray(source_thumbnail(self.source, max_size)))
        return self._jitter(image.permute(2, 0, 1)[None]).permute(0, 2, 3, 1)[0].numpy()

    def _jitter(self, tile: torch.Tensor) -> torch.Tensor:
        work_dtype = torch.float32 if tile.dtype in (torch.uint8, torch.float16, torch.bfloat16) else tile.dtype
        pixels = tile.to(work_dtype)
        red, green, blue = pixels[:, 0], pixels[:, 1], pixels[:, 2]
        # Separate element-wise products and sums (no matmul kernel, whose rounding can depend on
        # the tile's shape), so a pixel gets the same value whichever tile it is read in.
        out = torch.stack(
            [red * m[0] + green * m[1] + blue * m[2] + offset for m, offset in zip(self._matrix, self._offset)], dim=1
        )
        if tile.dtype == torch.uint8:
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return out.clamp_(0, 255).to(tile.dtype)


def pad_to_multiple(source: ImageSource, stride: int, fill: float = WHITE) -> CropView:
    """Pad ``source`` at the bottom and right with ``fill`` up to a multiple of ``stride``."""
    _, _, height, width = source.shape
    return CropView(source, Box(0, 0, round_up_to_multiple(height, stride), round_up_to_multiple(width, stride)), fill)


def crop_to_multiple(source: ImageSource, stride: int) -> CropView:
    """Crop the bottom and right of ``source`` down to a multiple of ``stride``."""
    _, _, height, width = source.shape
    return CropView(source, Box(0, 0, round_down_to_multiple(height, stride), round_down_to_multiple(width, stride)))
