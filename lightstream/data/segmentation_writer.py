"""Write a predicted segmentation of a whole slide as a tiled pyramidal TIFF, block by block.

A segmentation of a large slide does not fit in memory (a 100k x 100k level is 10 GB of ``uint8``),
so :class:`SegmentationWriter` takes it in blocks (e.g. the engine's output tiles, in any order) and
never holds it whole: each TIFF tile is kept zlib-compressed in a temporary file beside the output,
a block updates only the tiles it touches, and on :meth:`~SegmentationWriter.close` every lower
level is built from the level above it, tile by tile (``level[k + 1] = level[k][::2, ::2]``,
nearest-neighbour), before all levels are written with :func:`~lightstream.data.tiff_writer.write_tiff_pyramid`.
Memory stays at a few tiles; the temporary file holds the compressed pyramid (for label maps a small
fraction of the raw size). OpenSlide opens the result, and so does :class:`~lightstream.data.LabelMask`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lightstream.data.tiff_writer import check_writable, write_tiff_pyramid
from lightstream.data.views import slice_span

__all__ = ["SegmentationWriter", "write_segmentation", "label_pyramid_shapes"]

logger = logging.getLogger(__name__)

_ZLIB_LEVEL = 1
"""Fastest zlib level: label maps compress well anyway, and tiles are re-encoded on every partial update."""


def label_pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each level: halved (rounding up) until the level fits in one tile.

    Rounding up keeps nearest-neighbour exact for odd sizes: pixel ``i`` of level ``k + 1`` is
    pixel ``2 i`` of level ``k``, which always exists.
    """
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    return shapes


class SegmentationWriter:
    """Collect a label map block by block and write it as a pyramidal ``uint8`` TIFF on :meth:`close`.

    Use it as a context manager: the file is written when the block ends without an exception (an
    exception leaves no file). Pixels no block wrote read as ``fill``; a later block overwrites an
    earlier one where they overlap.

    Args:
        path: the TIFF file to write.
        shape: ``(height, width)`` of the label map (e.g. the slide level's, ``slide.shape[2:]``).
        mpp: micrometres per pixel of the map, stored so OpenSlide reports it (``slide.mpp``).
        tile: TIFF tile side (a multiple of 16).
        fill: label of pixels no block wrote.
        classes: optional class names, stored as JSON in the ImageDescription.
        overwrite: replace an existing ``path``; without it an existing file raises ``FileExistsError``
            (checked here, before any prediction is spent).

    >>> with SegmentationWriter("prediction.tif", slide.shape[2:], mpp=slide.mpp) as writer:  # doctest: +SKIP
    ...     for rows, cols, logits in predicted_tiles:
    ...         writer.write(rows, cols, logits.argmax(1))
    """

    def __init__(
        self,
        path: str | Path,
        shape: tuple[int, int],
        *,
        mpp: float | None = None,
        tile: int = 256,
        fill: int = 0,
        classes: Iterable[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        height, width = (int(size) for size in shape)
        if height < 1 or width < 1:
            raise ValueError(f"cannot write {self.path}: shape must be positive, got {tuple(shape)}")
        if tile < 16 or tile % 16:
            raise ValueError(f"cannot write {self.path}: tile must be a positive multiple of 16 (TIFF), got {tile}")
        if not 0 <= fill <= 255:
            raise ValueError(f"cannot write {self.path}: fill must be a uint8 label (0..255), got {fill}")
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"cannot write {self.path}: mpp must be a positive number or None, got {mpp}")
        check_writable(self.path, overwrite)
        self.shape = (height, width)
        self.mpp = mpp
        self.tile = tile
        self.fill = fill
        self.classes = tuple(classes) if classes is not None else None
        self.level_shapes = label_pyramid_shapes(height, width, tile)
        self._store = _TileStore(self.path.parent, tile, fill)
        self._closed = False

    def write(self, rows: slice, cols: slice, labels: np.ndarray | torch.Tensor) -> None:
        """Write ``labels`` (integer class indices ``[h, w]``, ``[1, h, w]`` or ``[1, 1, h, w]``) at ``[rows, cols]``."""
        if self._closed:
            raise ValueError(f"segmentation writer for {self.path} is closed")
        block = _as_label_block(labels, self.path)
        height, width = self.shape
        r0, r1 = slice_span(rows, height)
        c0, c1 = slice_span(cols, width)
        if block.shape != (r1 - r0, c1 - c0) or block.size == 0:
            raise ValueError(
                f"a block of {block.shape[0]}x{block.shape[1]} labels does not fit rows {rows}, cols {cols} of the "
                f"{height}x{width} map of {self.path}: give slices inside the map that span the block"
            )
        tile = self.tile
        for tile_row in range(r0 // tile, (r1 - 1) // tile + 1):
            for tile_col in range(c0 // tile, (c1 - 1) // tile + 1):
                top, left = tile_row * tile, tile_col * tile
                y0, y1, x0, x1 = max(r0, top), min(r1, top + tile), max(c0, left), min(c1, left + tile)
                covers = y0 == top and x0 == left and y1 == min(top + tile, height) and x1 == min(left + tile, width)
                pixels = self._store.blank() if covers else self._store.get((0, tile_row, tile_col))
                pixels[y0 - top : y1 - top, x0 - left : x1 - left] = block[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]
                self._store.put((0, tile_row, tile_col), pixels)

    def close(self) -> Path:
        """Build the lower levels and write the TIFF; returns its path. A second call does nothing."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            for level in range(1, len(self.level_shapes)):
                self._build_level(level)
            description = json.dumps({"generator": "lightstream.data.segmentation_writer", "classes": self.classes})
            write_tiff_pyramid(
                self.path,
                self.level_shapes,
                self._encoded_tiles,
                tile=self.tile,
                samples=1,
                dtype=np.uint8,
                compression="zlib",
                mpp=self.mpp,
                description=description,
            )
        finally:
            self._store.close()
        logger.info("wrote segmentation %s: %dx%d px, %d levels", self.path, *self.shape[::-1], len(self.level_shapes))
        return self.path

    def discard(self) -> None:
        """Drop everything written so far without writing the file."""
        self._closed = True
        self._store.close()

    def __enter__(self) -> SegmentationWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def _build_level(self, level: int) -> None:
        """Level ``level`` from the stored level above it: each tile takes every other pixel of 2 x 2 tiles."""
        tile, half = self.tile, self.tile // 2
        rows, cols = (-(-size // tile) for size in self.level_shapes[level])
        for tile_row in range(rows):
            for tile_col in range(cols):
                pixels = self._store.blank()
                for dy in (0, 1):
                    for dx in (0, 1):
                        above = self._store.get((level - 1, 2 * tile_row + dy, 2 * tile_col + dx))
                        pixels[dy * half : (dy + 1) * half, dx * half : (dx + 1) * half] = above[::2, ::2]
                self._store.put((level, tile_row, tile_col), pixels)

    def _encoded_tiles(self, level: int) -> Iterator[bytes]:
        """The zlib-encoded tiles of ``level`` in row-major order (TIFF deflate tiles as they are)."""
        rows, cols = (-(-size // self.tile) for size in self.level_shapes[level])
        for tile_row in range(rows):
            for tile_col in range(cols):
                yield self._store.get_encoded((level, tile_row, tile_col))


def write_segmentation(
    path: str | Path,
    blocks: Iterable[tuple[slice, slice, np.ndarray | torch.Tensor]],
    shape: tuple[int, int],
    **options: object,
) -> Path:
    """Write ``(rows, cols, labels)`` blocks (any order) as a pyramidal label TIFF; see :class:`SegmentationWriter`.

    ``blocks`` may be a generator, so the map is never built in memory; ``options`` go to the writer.
    """
    with SegmentationWriter(path, shape, **options) as writer:  # type: ignore[arg-type]
        for rows, cols, labels in blocks:
            writer.write(rows, cols, labels)
    return writer.path


class _TileStore:
    """Square ``uint8`` tiles keyed by ``(level, row, col)``, zlib-compressed in an anonymous temporary file.

    Rewritten tiles are appended (the old bytes stay unused in the file); tiles never stored read as
    ``fill``. Only the index lives in memory.
    """

    def __init__(self, folder: Path, tile: int, fill: int) -> None:
        self.tile, self.fill = tile, fill
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".segmentation-", suffix=".tiles")
        self._index: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._size = 0
        self._blank_encoded = zlib.compress(self.blank().tobytes(), _ZLIB_LEVEL)

    def blank(self) -> np.ndarray:
        return np.full((self.tile, self.tile), self.fill, dtype=np.uint8)

    def get(self, key: tuple[int, int, int]) -> np.ndarray:
        if key not in self._index:
            return self.blank()
        pixels = np.frombuffer(zlib.decompress(self.get_encoded(key)), dtype=np.uint8)
        return pixels.reshape(self.tile, self.tile).copy()

    def get_encoded(self, key: tuple[int, int, int]) -> bytes:
        if key not in self._index:
            return self._blank_encoded
        offset, count = self._index[key]
        self._file.seek(offset)
        return self._file.read(count)

    def put(self, key: tuple[int, int, int], pixels: np.ndarray) -> None:
        encoded = zlib.compress(pixels.tobytes(), _ZLIB_LEVEL)
        self._file.seek(self._size)
        self._file.write(encoded)
        self._index[key] = (self._size, len(encoded))
        self._size += len(encoded)

    def close(self) -> None:
        self._file.close()


def _as_label_block(labels: np.ndarray | torch.Tensor, path: Path) -> np.ndarray:
    """``labels`` as a 2-D ``uint8`` array, refusing non-integer dtypes and values outside 0..255."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(
            f"a block of labels for {path} must be [h, w] (or [1, h, w], [1, 1, h, w]), got shape {labels.shape}: "
            "pass class indices, e.g. logits.argmax(1)"
        )
    if array.dtype.kind not in "biu":
        raise ValueError(
            f"a block of labels for {path} must hold integer class indices, got {array.dtype}: "
            "pass logits.argmax(1) or (probability > 0.5) instead of scores"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"labels for {path} must lie in 0..255 (uint8), got {array.min()}..{array.max()}")
    return array.astype(np.uint8, copy=False)
