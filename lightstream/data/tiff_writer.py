"""Tiled pyramidal TIFFs written level by level from tile iterators, so no level is ever held in memory.

One writer for every pyramid the data layer makes (synthetic slides, their lesion masks, predicted
segmentations). Levels are written as main IFDs, level 0 first and the reduced ones marked
``subfiletype=1``, which OpenSlide's generic-TIFF driver reads as a pyramid; the resolution tags
(pixels per centimetre) carry the micrometres per pixel, which OpenSlide reports as
``openslide.mpp-x``/``-y``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

__all__ = ["check_writable", "write_tiff_pyramid"]


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` (checked before any costly work starts)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {path}; pass overwrite=True to replace it")


def write_tiff_pyramid(
    path: Path,
    level_shapes: Sequence[tuple[int, int]],
    level_tiles: Callable[[int], Iterator[np.ndarray] | Iterator[bytes]],
    *,
    tile: int,
    samples: int,
    dtype: np.dtype | type,
    compression: str | None,
    compressionargs: dict | None = None,
    mpp: float | None = None,
    description: str | None = None,
) -> None:
    """Write a tiled pyramid to ``path`` (to a hidden temporary name first, renamed when complete).

    Args:
        path: the TIFF file.
        level_shapes: ``(height, width)`` of every level, level 0 first.
        level_tiles: ``level_tiles(k)`` yields the tiles of level ``k`` in row-major order: arrays of
            at most ``tile x tile`` pixels (``[h, w, samples]`` or ``[h, w]``; edge tiles may be
            smaller) or bytes already encoded with ``compression``. Called once per level, in order.
        tile: tile side (a multiple of 16).
        samples: 3 for RGB, 1 for a single channel (written ``minisblack``).
        dtype: pixel type.
        compression: tifffile's compression name (``"jpeg"``, ``"zlib"``, ...) or ``None``.
        compressionargs: codec options, e.g. ``{"level": 90}`` for JPEG quality.
        mpp: micrometres per pixel at level 0, stored in the resolution tags; ``None`` stores none.
        description: the ImageDescription of level 0 (OpenSlide's ``tiff.ImageDescription``).
    """
    height, width = level_shapes[0]
    partial = path.with_name(f".{path.name}.partial")
    try:
        with tifffile.TiffWriter(partial, bigtiff=True) as tif:
            for level, (level_height, level_width) in enumerate(level_shapes):
                resolution = {}
                if mpp is not None:
                    pixels_per_cm = 1e4 / mpp
                    resolution = {
                        "resolution": (pixels_per_cm * (level_width / width), pixels_per_cm * (level_height / height)),
                        "resolutionunit": "CENTIMETER",
                    }
                tif.write(
                    level_tiles(level),
                    shape=(level_height, level_width, samples) if samples > 1 else (level_height, level_width),
                    dtype=dtype,
                    tile=(tile, tile),
                    photometric="rgb" if samples == 3 else "minisblack",
                    compression=compression,
                    compressionargs=compressionargs,
                    subfiletype=1 if level else 0,
                    description=description if level == 0 else None,
                    metadata=None,
                    software="lightstream",
                    **resolution,
                )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
