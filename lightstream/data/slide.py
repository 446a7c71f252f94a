"""Whole-slide images as lazy :class:`~lightstream.core.source.ImageSource` objects, read through OpenSlide."""

from __future__ import annotations

import logging
import math
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch

from lightstream.data.errors import SlideLevelError, SlideNotFoundError, UnsupportedSlideError
from lightstream.data.geometry import Box
from lightstream.data.views import WHITE, CropView, slice_span

__all__ = ["Slide", "open_slide", "MPP_TOLERANCE"]

logger = logging.getLogger(__name__)

MPP_TOLERANCE = 0.05
"""A level counts as "not coarser" than a requested mpp if it is at most this fraction coarser.

Scanners store levels whose downsample is a hair off a power of two (e.g. 4.0002), so a level at
1.0008 mpp must still serve a request for 1.0 mpp.
"""

_BLOCK = 512
"""Side of the aligned blocks read at levels whose downsample is not an integer (see ``Slide.read``)."""
_CACHED_BLOCKS = 16
_THUMBNAIL_BAND_PIXELS = 1 << 24
"""Level pixels read at once while building a thumbnail (about 64 MB of RGBA)."""

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_DATA_TAGS = (273, 279, 324, 325)
"""StripOffsets, StripByteCounts, TileOffsets, TileByteCounts."""
_TIFF_INTEGER_TYPES = {3: "u2", 4: "u4", 16: "u8"}
"""TIFF field types SHORT, LONG and LONG8, as numpy dtypes."""
_DAMAGED = "truncated or corrupt"


class Slide:
    """One pyramid level of a whole-slide image, read lazily tile by tile.

    Implements :class:`~lightstream.core.source.ImageSource`: ``shape`` is ``(1, 3, H, W)`` of the
    chosen level and ``read(rows, cols)`` returns an RGB ``uint8`` tensor ``[1, 3, h, w]``. Pixels
    that OpenSlide reports as transparent (outside the scanned area) are composited onto
    ``background``.

    Reads are safe from several threads (e.g. one background prefetch thread): OpenSlide handles are
    thread-safe and the block cache is locked. A slide can be pickled (it reopens the file), so
    samples can cross ``DataLoader`` worker processes. Use it as a context manager or call
    :meth:`close` to release the file.

    At a level whose downsample is not an integer (real scanners: 4.0002...), OpenSlide resamples
    the region by a sub-pixel offset that depends on where the region starts, so the same pixel
    would read differently from two overlapping tiles. There the slide reads fixed aligned blocks
    of 512 px and assembles tiles from them, so a pixel's value depends only on its coordinates.
    """

    def __init__(
        self, path: str | Path, level: int | None = None, mpp: float | None = None, background: int = WHITE
    ) -> None:
        self.path = Path(path)
        self.background = background
        self._osr: openslide.OpenSlide | None = _open_openslide(self.path)
        self.level_shapes: tuple[tuple[int, int], ...] = tuple((h, w) for w, h in self._osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._osr.level_downsamples)
        self.base_mpp: float | None = _read_base_mpp(self._osr.properties)
        try:
            self.level = self._resolve_level(level, mpp)
        except BaseException:
            self._osr.close()
            raise
        self._exact_reads = self.downsample == round(self.downsample)  # else: read aligned blocks
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._blocks_lock = threading.Lock()
        logger.debug("opened %s at level %d, shape %s", self.path, self.level, self.shape)

    # ----------------------------------------------------------------------------------- metadata
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(1, 3, H, W)`` of the chosen level."""
        height, width = self.level_shapes[self.level]
        return 1, 3, height, width

    @property
    def level_count(self) -> int:
        """Number of pyramid levels in the file."""
        return len(self.level_shapes)

    @property
    def downsample(self) -> float:
        """Level-0 pixels per pixel of the chosen level."""
        return self.level_downsamples[self.level]

    @property
    def mpp(self) -> float | None:
        """Micrometres per pixel of the chosen level, or ``None`` if the file stores no resolution."""
        return None if self.base_mpp is None else self.base_mpp * self.downsample

    @property
    def level_mpps(self) -> tuple[float, ...] | None:
        """Micrometres per pixel of every level, or ``None`` without resolution metadata."""
        if self.base_mpp is None:
            return None
        return tuple(self.base_mpp * d for d in self.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's property map (vendor metadata, ``openslide.mpp-x``, ...)."""
        return dict(self._handle().properties)

    # -------------------------------------------------------------------------------------- reads
    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        """Pixels ``[:, :, rows, cols]`` of the chosen level as an RGB ``uint8`` tensor ``[1, 3, h, w]``."""
        _, _, height, width = self.shape
        r0, r1 = slice_span(rows, height)
        c0, c1 = slice_span(cols, width)
        if r1 == r0 or c1 == c0:
            return torch.empty((1, 3, r1 - r0, c1 - c0), dtype=torch.uint8)
        if self._exact_reads:
            rgb = self._read_region(self.level, r0, c0, r1 - r0, c1 - c0)
        else:
            rgb = self._read_from_blocks(r0, r1, c0, c1)
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]

    def crop(self, box: Box, fill: float | None = None) -> CropView:
        """A lazy view of ``box`` (chosen-level pixels); parts outside the slide read as ``fill``."""
        return CropView(self, box, self.background if fill is None else fill)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide as an RGB ``uint8`` array ``[h, w, 3]`` whose longer side is at most ``max_size``.

        Built from the coarsest level that is still at least ``max_size`` px on its longer side,
        box-averaged by an integer factor; that level is read in bands of rows, so even a slide
        without a pyramid never has a whole level in memory. Pixel ``(i, j)`` covers about
        ``H0 / h x W0 / w`` level-0 pixels from ``(i * H0 / h, j * W0 / w)``.

        Raises:
            ValueError: ``max_size`` is not a positive integer.
        """
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer (pixels), got {max_size!r} for {self.path}")
        height0, width0 = self.level_shapes[0]
        wanted = max(height0, width0) / max_size
        level = max(k for k, downsample in enumerate(self.level_downsamples) if k == 0 or downsample <= wanted)
        height, width = self.level_shapes[level]
        factor = max(1, math.ceil(max(height, width) / max_size))
        band = factor * max(1, _THUMBNAIL_BAND_PIXELS // (width * factor * factor))
        bands = [
            _box_average(self._read_region(level, top, 0, min(band, height - top), width), factor)
            for top in range(0, height, band)
        ]
        return np.concatenate(bands)

    def _read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """OpenSlide's ``read_region`` of a rectangle in ``level`` pixels, as RGB ``[h, w, 3]``."""
        downsample = self.level_downsamples[level]
        location = (round(left * downsample), round(top * downsample))
        try:
            rgba = np.asarray(self._handle().read_region(location, level, (width, height)))
        except openslide.OpenSlideError as exc:
            raise UnsupportedSlideError(
                self.path, f"cannot read pixels of {self.path} at level {level}: the file is {_DAMAGED} ({exc})"
            ) from exc
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if alpha.min() == 255:
            return rgb
        composite = rgb.astype(np.uint16) * alpha + np.uint16(self.background) * (255 - alpha.astype(np.uint16))
        return ((composite + 127) // 255).astype(np.uint8)

    def _read_from_blocks(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.empty((r1 - r0, c1 - c0, 3), dtype=np.uint8)
        for block_row in range(r0 // _BLOCK, (r1 - 1) // _BLOCK + 1):
            for block_col in range(c0 // _BLOCK, (c1 - 1) // _BLOCK + 1):
                block = self._block(block_row, block_col)
                top, left = block_row * _BLOCK, block_col * _BLOCK
                y0, y1 = max(r0, top), min(r1, top + block.shape[0])
                x0, x1 = max(c0, left), min(c1, left + block.shape[1])
                out[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = block[y0 - top : y1 - top, x0 - left : x1 - left]
        return out

    def _block(self, block_row: int, block_col: int) -> np.ndarray:
        key = (block_row, block_col)
        with self._blocks_lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        _, _, height, width = self.shape
        top, left = block_row * _BLOCK, block_col * _BLOCK
        block = self._read_region(self.level, top, left, min(_BLOCK, height - top), min(_BLOCK, width - left))
        with self._blocks_lock:
            self._blocks[key] = block
            while len(self._blocks) > _CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        return block

    # ---------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the OpenSlide handle; later reads raise ``ValueError``."""
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        with self._blocks_lock:
            self._blocks.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "level": self.level, "background": self.background}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], level=state["level"], background=state["background"])  # type: ignore[misc]

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g}"
        return f"Slide('{self.path}', level={self.level}, shape={self.shape}, mpp={mpp})"

    # ----------------------------------------------------------------------------------- helpers
    def _handle(self) -> openslide.OpenSlide:
        if self._osr is None:
            raise ValueError(f"slide {self.path} is closed")
        return self._osr

    def _resolve_level(self, level: int | None, mpp: float | None) -> int:
        if level is not None and mpp is not None:
            raise ValueError(f"open {self.path} with either level= or mpp=, not both (got level={level}, mpp={mpp})")
        if mpp is not None:
            return self._level_for_mpp(mpp)
        if level is None:
            return 0
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise SlideLevelError(
                self.path,
                f"level {level!r} is out of range for {self.path}: it has {self.level_count} level(s), "
                f"0..{self.level_count - 1}",
            )
        return int(level)

    def _level_for_mpp(self, mpp: float) -> int:
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise SlideLevelError(self.path, f"mpp must be a positive number, got {mpp!r} for {self.path}")
        level_mpps = self.level_mpps
        if level_mpps is None:
            raise SlideLevelError(
                self.path,
                f"{self.path} stores no resolution (no openslide.mpp-x property), so mpp={mpp} cannot "
                "pick a level; pass level= instead",
            )
        fine_enough = [k for k, level_mpp in enumerate(level_mpps) if level_mpp <= mpp * (1 + MPP_TOLERANCE)]
        if not fine_enough:
            raise SlideLevelError(
                self.path,
                f"mpp={mpp} is out of range for {self.path}: its finest level has {level_mpps[0]:.4g} "
                "micrometres per pixel, and levels are never upsampled",
            )
        chosen = max(fine_enough)
        if level_mpps[chosen] < mpp * (1 - MPP_TOLERANCE):
            logger.info(
                "%s: no level at %.4g mpp; using level %d at %.4g mpp (the closest finer one)",
                self.path,
                mpp,
                chosen,
                level_mpps[chosen],
            )
        return chosen


def open_slide(path: str | Path, level: int | None = None, mpp: float | None = None) -> Slide:
    """Open a whole-slide image lazily at one pyramid level.

    Args:
        path: any file OpenSlide reads (tiled pyramidal TIFF, SVS, NDPI, MRXS, SCN, BIF, DICOM, ...).
        level: pyramid level to read (0 = full resolution).
        mpp: target micrometres per pixel instead of ``level``: picks the coarsest level that is not
            coarser than ``mpp`` (within :data:`MPP_TOLERANCE`), i.e. the closest one from the fine side.
            Neither given: level 0.

    Raises:
        SlideNotFoundError: the file does not exist (a ``FileNotFoundError``).
        UnsupportedSlideError: OpenSlide cannot read it (a ``ValueError``).
        SlideLevelError: ``level`` is out of range, or ``mpp`` is finer than level 0 or the file has no
            resolution metadata (a ``ValueError``).
    """
    return Slide(path, level=level, mpp=mpp)


def _open_openslide(path: Path) -> openslide.OpenSlide:
    if not path.exists():
        raise SlideNotFoundError(path, f"slide file not found: {path}")
    if not path.is_file():
        raise UnsupportedSlideError(path, f"cannot open {path} as a slide: it is not a file")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnsupportedSlideError(path, f"cannot read {path} as a slide: {_unsupported_hint(path)}") from exc
    except openslide.OpenSlideError as exc:
        raise UnsupportedSlideError(path, f"cannot read {path} as a slide: the file is {_DAMAGED} ({exc})") from exc


def _unsupported_hint(path: Path) -> str:
    """Why OpenSlide refused ``path``: empty, a damaged TIFF, an untiled TIFF, or another format."""
    if path.stat().st_size == 0:
        return f"the file is empty ({_DAMAGED}: was it copied completely?)"
    if not _is_tiff(path):
        return ("OpenSlide does not recognise its format (it reads tiled pyramidal TIFF, SVS, NDPI, "
                "MRXS, SCN, BIF, DICOM, ...); for an image already in memory use lightstream.core.source.TensorSource")
    damage = _tiff_damage(path)
    if damage is not None:
        return f"the file is {_DAMAGED}: {damage} (was it copied completely?)"
    return ("it is a TIFF, but OpenSlide reads only tiled TIFFs (convert it to a tiled pyramid, e.g. "
            "with `vips tiffsave --tile --pyramid`)")


def _box_average(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor x factor`` block (edge blocks padded by repeating the last pixels)."""
    if factor == 1:
        return rgb
    height, width = rgb.shape[:2]
    padded = np.pad(rgb, ((0, -height % factor), (0, -width % factor), (0, 0)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor, 3)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) in _TIFF_MAGICS


class _TiffDamage(Exception):
    """A TIFF structure that points outside its file."""


def _tiff_damage(path: Path) -> str | None:
    """What in a TIFF's structure lies past the end of its file, or ``None`` if nothing does.

    Walks the chain of image directories (classic TIFF and BigTIFF) and checks that every
    directory, and every strip or tile its offsets point to, lies inside the file: a file cut
    short (an interrupted copy or download) fails here, an intact untiled TIFF does not.
    """
    size = path.stat().st_size
    with path.open("rb") as file:

        def read(offset: int, length: int) -> bytes:
            file.seek(offset)
            data = file.read(length)
            if len(data) < length:
                raise _TiffDamage(f"it has {size} bytes, but its structure reads {length} bytes at byte {offset}")
            return data

        try:
            order = "<" if read(0, 2) == b"II" else ">"
            big = struct.unpack(order + "H", read(2, 2))[0] == 43
            offset_code, count_code, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
            width = struct.calcsize(offset_code)
            directory = struct.unpack(order + offset_code, read(8 if big else 4, width))[0]
            seen: set[int] = set()
            while directory and directory not in seen:
                seen.add(directory)
                count = struct.unpack(order + count_code, read(directory, struct.calcsize(count_code)))[0]
                table = read(directory + struct.calcsize(count_code), count * entry_size + width)
                arrays = {}
                for start in range(0, count * entry_size, entry_size):
                    tag, kind, length = struct.unpack(order + "HH" + offset_code, table[start : start + 4 + width])
                    if tag in _TIFF_DATA_TAGS and kind in _TIFF_INTEGER_TYPES:
                        dtype = np.dtype(_TIFF_INTEGER_TYPES[kind]).newbyteorder(order)
                        field = table[start + 4 + width : start + entry_size]
                        nbytes = length * dtype.itemsize
                        where = struct.unpack(order + offset_code, field)[0]
                        raw = field[:nbytes] if nbytes <= width else read(where, nbytes)
                        arrays[tag] = np.frombuffer(raw, dtype).astype(np.int64)
                for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
                    if offsets_tag in arrays and counts_tag in arrays:
                        ends = arrays[offsets_tag] + arrays[counts_tag]
                        if ends.size and ends.max() > size:
                            raise _TiffDamage(f"its image data runs to byte {ends.max()}, past its end at "
                                              f"byte {size}")
                directory = struct.unpack(order + offset_code, table[-width:])[0]
        except _TiffDamage as damage:
            return str(damage)
    return None


def _read_base_mpp(properties: Any) -> float | None:
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(properties[key])
        except (KeyError, ValueError):
            return None
        if not (math.isfinite(value) and value > 0):
            return None
        values.append(value)
    return sum(values) / 2
