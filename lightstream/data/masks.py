"""Label masks (one class index per pixel) as lazy :class:`~lightstream.core.source.ImageSource` objects.

A label mask is a TIFF of integer class indices, one channel, tiled or striped, with or without a
pyramid (e.g. what :func:`~lightstream.data.write_synthetic_slide` writes with ``mask_path=``, or
:class:`~lightstream.data.SegmentationWriter`). It may be stored at another resolution than its
slide and with fewer levels: :class:`LabelMask` reads it *on the pixel grid of a slide level*, so
``mask.read(rows, cols)`` is the target of ``slide.read(rows, cols)``, pixel for pixel.

Resampling is nearest-neighbour with the rule of ``torch.nn.functional.interpolate(mode="nearest")``:
target pixel ``i`` takes mask pixel ``floor(i * mask_size / target_size)`` along each axis (exact
integer arithmetic). The mask is read from its coarsest level that is still at least as fine as the
target (else its finest level), decoding only the TIFF tiles that hold the sampled pixels, so a
read never holds more than the tile asked for and one decoded mask tile. Because the rule composes
over power-of-two pyramids whose levels take every other pixel (``level[k + 1] = level[k][::2, ::2]``,
as :class:`~lightstream.data.SegmentationWriter` builds them), reading such a pyramid at any level
equals nearest-neighbour downsampling its full-resolution level.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from lightstream.data.dataset import _check_mask_matches
from lightstream.data.errors import SlideNotFoundError, UnsupportedSlideError
from lightstream.data.slide import Slide
from lightstream.data.views import slice_span

__all__ = ["LabelMask", "open_label_mask"]

logger = logging.getLogger(__name__)

_CACHED_SEGMENTS = 64
"""Decoded mask tiles kept per mask (64 tiles of 256 x 256 ``uint8`` = 4 MiB)."""


class LabelMask:
    """A label-mask TIFF read lazily on a ``height x width`` target grid (a slide level's).

    Implements :class:`~lightstream.core.source.ImageSource`: ``shape`` is ``(1, 1, height, width)``
    and ``read(rows, cols)`` returns the class indices ``[1, 1, h, w]`` (``uint8`` for 8-bit and
    1-bit masks, ``int64`` for wider integers). The mask's whole extent is mapped onto the target
    grid (see the module docstring for the rule). Pickles by path; thread-safe; close it or use it
    as a context manager.

    Args:
        path: the mask TIFF.
        shape: ``(height, width)`` of the grid to read on, e.g. ``slide.shape[2:]``.

    Raises:
        SlideNotFoundError: the file does not exist.
        UnsupportedSlideError: it is not a TIFF, or it holds no integer labels in one channel.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int]) -> None:
        self.path = Path(path)
        height, width = (int(size) for size in shape)
        if height < 1 or width < 1:
            raise ValueError(f"cannot read label mask {self.path} on a {height}x{width} grid: sizes must be positive")
        self._target_shape = (height, width)
        self._tif = _open_tiff(self.path)
        try:
            levels = self._tif.series[0].levels
            _check_labels(self.path, levels[0])
            self.level_shapes: tuple[tuple[int, int], ...] = tuple(tuple(level.shape[:2]) for level in levels)
            fine_enough = [k for k, (h, w) in enumerate(self.level_shapes) if h >= height and w >= width]
            self.level = max(fine_enough, default=0)
            self._page = levels[self.level].keyframe
        except BaseException:
            self._tif.close()
            raise
        page = self._page
        if page.is_tiled:
            self._segment_shape = (page.tilelength, page.tilewidth)
        else:
            self._segment_shape = (min(page.rowsperstrip, page.imagelength), page.imagewidth)
        self._wide = page.dtype not in (np.uint8, np.bool_)
        self._segments: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()
        logger.debug("opened label mask %s on a %dx%d grid from its level %d", self.path, width, height, self.level)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(1, 1, height, width)`` of the target grid."""
        return 1, 1, *self._target_shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of what :meth:`read` returns."""
        return torch.int64 if self._wide else torch.uint8

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        """Class indices ``[:, :, rows, cols]`` of the target grid as a ``[1, 1, h, w]`` tensor."""
        height, width = self._target_shape
        r0, r1 = slice_span(rows, height)
        c0, c1 = slice_span(cols, width)
        labels = self._gather(self._mask_indices(np.arange(r0, r1), 0), self._mask_indices(np.arange(c0, c1), 1))
        return torch.from_numpy(labels)[None, None]

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The labels as ``[h, w, 1]`` with the longer side at most ``max_size`` (every ``f``-th target pixel)."""
        height, width = self._target_shape
        step = max(1, math.ceil(max(height, width) / max_size))
        rows = self._mask_indices(np.arange(0, height, step), 0)
        cols = self._mask_indices(np.arange(0, width, step), 1)
        return self._gather(rows, cols)[..., None]

    # ---------------------------------------------------------------------------------- internals
    def _mask_indices(self, target: np.ndarray, axis: int) -> np.ndarray:
        """Mask-level pixel of each target pixel along ``axis`` (``floor(i * mask / target)``, exact)."""
        return target.astype(np.int64) * self.level_shapes[self.level][axis] // self._target_shape[axis]

    def _gather(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``level[rows][:, cols]`` for non-decreasing index arrays, one decoded tile at a time."""
        out = np.empty((rows.size, cols.size), dtype=np.int64 if self._wide else np.uint8)
        segment_height, segment_width = self._segment_shape
        segments_across = -(-self._page.imagewidth // segment_width)
        row_bands = _runs(rows // segment_height)
        col_bands = _runs(cols // segment_width)
        for band_row, row_start, row_stop in row_bands:
            local_rows = rows[row_start:row_stop] - band_row * segment_height
            for band_col, col_start, col_stop in col_bands:
                segment = self._segment(band_row * segments_across + band_col)
                if segment is None:
                    out[row_start:row_stop, col_start:col_stop] = 0
                    continue
                local_cols = cols[col_start:col_stop] - band_col * segment_width
                out[row_start:row_stop, col_start:col_stop] = segment[np.ix_(local_rows, local_cols)]
        return out

    def _segment(self, index: int) -> np.ndarray | None:
        """Decoded tile (or strip) ``index`` of the chosen level as ``[h, w]``; ``None`` if the file stores none."""
        with self._lock:
            if index in self._segments:
                self._segments.move_to_end(index)
                return self._segments[index]
            handle = self._handle()
            offset, count = self._page.dataoffsets[index], self._page.databytecounts[index]
            data = None
            if count:
                handle.filehandle.seek(offset)
                data = handle.filehandle.read(count)
        try:
            decoded = self._page.decode(data, index, jpegtables=self._page.jpegtables)[0]
        except Exception as exc:
            message = f"cannot decode tile {index} of label mask {self.path}: {exc}"
            raise UnsupportedSlideError(self.path, message) from exc
        segment = None if decoded is None else decoded.reshape(decoded.shape[-3], decoded.shape[-2])
        if segment is not None and segment.dtype == np.bool_:
            segment = segment.view(np.uint8)
        with self._lock:
            self._segments[index] = segment
            while len(self._segments) > _CACHED_SEGMENTS:
                self._segments.popitem(last=False)
        return segment

    def _handle(self) -> tifffile.TiffFile:
        if self._tif is None:
            raise ValueError(f"label mask {self.path} is closed")
        return self._tif

    # ---------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the file; later reads raise ``ValueError``."""
        with self._lock:
            if self._tif is not None:
                self._tif.close()
                self._tif = None
            self._segments.clear()

    def __enter__(self) -> LabelMask:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "shape": self._target_shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["shape"])  # type: ignore[misc]

    def __repr__(self) -> str:
        height, width = self._target_shape
        mask_height, mask_width = self.level_shapes[self.level]
        return f"LabelMask('{self.path}', grid {width}x{height}, read from level {self.level} ({mask_width}x{mask_height}))"


def open_label_mask(path: str | Path, slide: Slide) -> LabelMask:
    """Open the label mask of ``slide`` on the pixel grid of the slide's chosen level.

    The mask may be stored at any uniform downsample of the slide's level 0 and with any number of
    levels; it must have the slide's aspect ratio (up to one mask pixel of rounding).

    Raises:
        SlideNotFoundError: the mask file does not exist.
        UnsupportedSlideError: it is not a TIFF of integer labels in one channel.
        MaskMismatchError: its size or aspect ratio does not match the slide (the message names both
            files and sizes).
    """
    mask = LabelMask(path, slide.shape[2:])
    try:
        _check_mask_matches(mask.path, mask.level_shapes[0], slide)
    except BaseException:
        mask.close()
        raise
    return mask


def _open_tiff(path: Path) -> tifffile.TiffFile:
    if not path.is_file():
        raise SlideNotFoundError(path, f"label mask not found: {path}")
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:
        raise UnsupportedSlideError(
            path,
            f"cannot read label mask {path}: {exc}. Label masks are read lazily from TIFF files; write one with "
            "lightstream.data.SegmentationWriter or "
            "tifffile.imwrite(path, labels, tile=(256, 256), compression='zlib')",
        ) from exc


def _check_labels(path: Path, level: tifffile.TiffPageSeries) -> None:
    """One channel of integer class indices, one plane."""
    page = level.keyframe
    if page.samplesperpixel > 1 or len(level.shape) != 2:
        raise UnsupportedSlideError(
            path,
            f"label mask {path} has shape {level.shape} (axes {level.axes}); a label mask has one channel "
            "of class indices (height x width): convert a colour rendering to indices first",
        )
    if page.dtype.kind not in "biu":
        raise UnsupportedSlideError(
            path,
            f"label mask {path} holds {page.dtype} pixels; a label mask holds integer class indices "
            "(e.g. uint8): threshold or argmax a probability map before saving it",
        )


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """``(value, start, stop)`` of each run of equal values in a non-decreasing array."""
    if not values.size:
        return []
    starts = np.flatnonzero(np.diff(values)) + 1
    bounds = np.concatenate(([0], starts, [values.size]))
    return [(int(values[start]), int(start), int(stop)) for start, stop in zip(bounds[:-1], bounds[1:])]
