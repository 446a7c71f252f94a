"""Synthetic whole-slide images: pyramidal tiled TIFFs with tissue-like content and optional lesions.

The content is a pure function of level-0 coordinates and the seed, evaluated tile by tile, so a
32k x 32k slide is written without ever holding a level in memory:

* tissue: pinkish blobs (smooth value noise plus a bias towards the centre) on white glass, with
  an H&E-like texture whose octaves fade out when they get finer than a level's pixels;
* lesions: clusters of small dark nuclei (Gaussian dots, sigma 1.5-2.5 px at level 0). Coarser
  levels draw each nucleus pre-filtered to their pixel size (mass-preserving Gaussian widening),
  so a lesion is plain at full resolution and 2x, faint at 4x and practically gone from 8x on.

Files open with OpenSlide's generic-TIFF driver, which reports ``openslide.mpp-x``/``-y`` from the
TIFF resolution tags (written in pixels per centimetre). The pyramid halves both sides per level
while both are even and the level is larger than one tile, so every downsample is an exact power
of two (OpenSlide resamples reads at non-integer downsamples).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tifffile

from lightstream.data.dataset import SlideRecord, write_slide_table
from lightstream.data.tiff_writer import check_writable, write_tiff_pyramid

__all__ = ["Lesion", "SyntheticSlide", "write_synthetic_slide", "write_synthetic_dataset"]

logger = logging.getLogger(__name__)

_GLASS = np.array([244.0, 242.0, 246.0], dtype=np.float32)
_EOSIN = np.array([233.0, 150.0, 192.0], dtype=np.float32)
_HEMATOXYLIN = np.array([160.0, 98.0, 178.0], dtype=np.float32)
_NUCLEUS = np.array([58.0, 26.0, 96.0], dtype=np.float32)
_TEXTURE_OCTAVES = ((384.0, 1.0), (96.0, 0.6), (24.0, 0.4), (8.0, 0.25))  # (lattice spacing in level-0 px, amplitude)
_GRAIN = 3.0  # per-pixel noise amplitude (intensity levels)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Lesion:
    """A cluster of dark nuclei; ``center_y``, ``center_x`` and ``radius`` are in level-0 pixels."""

    center_y: float
    center_x: float
    radius: float


@dataclass(frozen=True)
class SyntheticSlide:
    """What :func:`write_synthetic_slide` wrote.

    Attributes:
        path: the TIFF file.
        size: ``(height, width)`` of level 0.
        mpp: micrometres per pixel at level 0.
        level_shapes: ``(height, width)`` of every pyramid level.
        lesions: the lesions drawn (level-0 coordinates).
        seed: the seed the content was drawn from.
        mask_path: the lesion label mask written beside it, or ``None``.
    """

    path: Path
    size: tuple[int, int]
    mpp: float
    level_shapes: tuple[tuple[int, int], ...]
    lesions: tuple[Lesion, ...]
    seed: int
    mask_path: Path | None = None

    @property
    def label(self) -> int:
        """1 if the slide has lesions, else 0."""
        return int(bool(self.lesions))


def write_synthetic_slide(
    path: str | Path,
    size: tuple[int, int] = (4096, 4096),
    lesions: int = 0,
    seed: int = 0,
    tile: int = 256,
    mpp: float = 0.5,
    compression: str | None = "jpeg",
    quality: int = 90,
    lesion_radius: float = 96.0,
    workers: int | None = None,
    overwrite: bool = False,
    mask_path: str | Path | None = None,
) -> SyntheticSlide:
    """Write a pyramidal tiled TIFF of synthetic tissue, deterministic from ``seed``.

    With ``mask_path`` the lesions' label mask is written beside it: a lossless single-channel
    ``uint8`` pyramid with the slide's levels, tiles and mpp, 1 on every pixel whose centre lies
    inside a lesion (the disc its nuclei are drawn in) and 0 elsewhere, rendered at every level
    from the same pixel centres as the slide (open it with
    :func:`~lightstream.data.masks.open_label_mask`).

    Args:
        path: output file; written to a temporary name first and renamed when complete.
        size: ``(height, width)`` of level 0 in pixels.
        lesions: number of lesions (clusters of dark nuclei, placed inside tissue).
        seed: content seed; the same arguments always give the same pixels.
        tile: TIFF tile side (a multiple of 16).
        mpp: micrometres per pixel at level 0, stored in the resolution tags.
        compression: TIFF compression: ``"jpeg"`` (lossy, small, fast), ``"zlib"``, ``"lzw"``
            (lossless) or ``None``.
        quality: JPEG quality (ignored by the other codecs).
        lesion_radius: largest lesion radius in level-0 pixels (each is 60-100 % of it).
        workers: threads rendering tiles (default: up to 4, bounded by the CPU count).
        overwrite: replace existing files; without it an existing ``path`` (or ``mask_path``) raises
            ``FileExistsError``.
        mask_path: where to write the lesion label mask; ``None`` writes none.

    Returns:
        the slide's metadata, including the lesion centres for labels.
    """
    path = Path(path)
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"cannot write {path}: size must be positive, got {size}")
    if tile < 16 or tile % 16:
        raise ValueError(f"cannot write {path}: tile must be a positive multiple of 16 (TIFF), got {tile}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"cannot write {path}: mpp must be a positive number, got {mpp}")
    mask_path = Path(mask_path) if mask_path is not None else None
    for output in (path, mask_path):
        if output is not None:
            check_writable(output, overwrite)
    renderer = _TissueRenderer(height, width, seed, lesions, lesion_radius)
    level_shapes = _pyramid_shapes(height, width, tile)
    workers = workers or min(4, os.cpu_count() or 1)
    description = json.dumps(
        {
            "generator": "lightstream.data.synthetic",
            "seed": seed,
            "mpp": mpp,
            "lesions": [asdict(lesion) for lesion in renderer.lesions],
        }
    )
    with ThreadPoolExecutor(workers) as pool:

        def write(output: Path, render: Callable[[int, int, int, int, int], np.ndarray], **options: Any) -> None:
            tiles = _rendered_levels(pool, render, level_shapes, tile, workers)
            write_tiff_pyramid(output, level_shapes, tiles, tile=tile, dtype=np.uint8, mpp=mpp, **options)

        compressionargs = {"level": quality} if compression == "jpeg" else None
        write(path, renderer.render, samples=3, compression=compression, compressionargs=compressionargs,
              description=description)
        if mask_path is not None:
            write(mask_path, renderer.lesion_labels, samples=1, compression="zlib")
    logger.info("wrote %s: %dx%d px, %d levels, %d lesions", path, width, height, len(level_shapes), lesions)
    return SyntheticSlide(path, (height, width), mpp, tuple(level_shapes), renderer.lesions, seed, mask_path)


def write_synthetic_dataset(
    folder: str | Path,
    n: int,
    size: tuple[int, int] = (2048, 2048),
    seed: int = 0,
    positive_fraction: float = 0.5,
    lesions: int = 3,
    masks: bool = False,
    mask_downsample: int = 16,
    overwrite: bool = False,
    label_masks: bool = False,
    **slide_options: object,
) -> list[SlideRecord]:
    """Write ``n`` labelled synthetic slides and a ``labels.csv`` table into ``folder``.

    Slides with label 1 carry ``lesions`` lesions, slides with label 0 none; labels are shuffled
    deterministically from ``seed``. With ``masks=True`` each slide also gets a tissue mask (a
    ``uint8`` TIFF, 255 = tissue, ``mask_downsample`` times smaller than level 0). With
    ``label_masks=True`` each slide also gets its lesion label mask (``slide_000_labels.tif``, see
    ``mask_path`` of :func:`write_synthetic_slide`) for segmentation.

    The table has columns ``path,label`` (and ``mask``, ``label_mask``) with paths relative to ``folder``; read it
    back with :func:`~lightstream.data.dataset.read_slide_table`. Existing files raise
    ``FileExistsError`` unless ``overwrite=True``.

    Returns:
        one :class:`~lightstream.data.dataset.SlideRecord` per slide (absolute paths).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "labels.csv"
    if table.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {table}; pass overwrite=True to replace it")
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=int)
    labels[: round(n * positive_fraction)] = 1
    rng.shuffle(labels)
    records = []
    for index, label in enumerate(labels):
        slide_path = folder / f"slide_{index:03d}.tif"
        slide_seed = int(rng.integers(2**31))
        label_mask_path = folder / f"slide_{index:03d}_labels.tif" if label_masks else None
        write_synthetic_slide(
            slide_path,
            size,
            lesions=lesions if label else 0,
            seed=slide_seed,
            overwrite=overwrite,
            mask_path=label_mask_path,
            **slide_options,
        )
        mask_path = None
        if masks:
            mask_path = folder / f"slide_{index:03d}_mask.tif"
            if mask_path.exists() and not overwrite:
                raise FileExistsError(f"refusing to overwrite {mask_path}; pass overwrite=True to replace it")
            mask = _TissueRenderer(size[0], size[1], slide_seed, 0, 0.0).tissue_mask(mask_downsample)
            tifffile.imwrite(mask_path, mask, compression="zlib")
        records.append(SlideRecord(slide_path, int(label), mask_path, label_mask_path))
    write_slide_table(table, records)
    return records


# ------------------------------------------------------------------------------------- rendering
class _TissueRenderer:
    """Pixels of a synthetic slide as a pure function of coordinates, level and seed."""

    def __init__(self, height: int, width: int, seed: int, lesions: int, lesion_radius: float) -> None:
        self.height, self.width, self.seed = height, width, seed
        self._blob_spacing = max(height, width) / 3
        rng = np.random.default_rng([seed, 1])
        self.lesions = tuple(self._place_lesion(rng, lesion_radius) for _ in range(lesions))
        centers_y, centers_x, sigmas = [], [], []
        for lesion in self.lesions:
            count = max(12, int(0.006 * lesion.radius**2))
            distance = lesion.radius * np.sqrt(rng.uniform(0, 1, count))
            angle = rng.uniform(0, 2 * np.pi, count)
            centers_y.append(lesion.center_y + distance * np.sin(angle))
            centers_x.append(lesion.center_x + distance * np.cos(angle))
            sigmas.append(rng.uniform(1.5, 2.5, count))
        self._nuclei_y = np.concatenate(centers_y) if centers_y else np.empty(0)
        self._nuclei_x = np.concatenate(centers_x) if centers_x else np.empty(0)
        self._nuclei_sigma = np.concatenate(sigmas) if sigmas else np.empty(0)

    def render(self, top: int, left: int, height: int, width: int, downsample: int) -> np.ndarray:
        """RGB ``uint8 [height, width, 3]`` of the level with this ``downsample``, from pixel ``(top, left)``."""
        ys = (np.arange(top, top + height) + 0.5) * downsample
        xs = (np.arange(left, left + width) + 0.5) * downsample
        level = downsample.bit_length() - 1
        grain = _GRAIN * _hash_uniform(
            np.arange(top, top + height)[:, None], np.arange(left, left + width)[None, :], _key(self.seed, 100 + level)
        )
        tissue = self.tissue_alpha(ys, xs, downsample)
        has_tissue = bool(tissue.max() > 0)
        if has_tissue:
            texture = sum(
                weight * amplitude * _value_noise(ys, xs, spacing, _key(self.seed, 10 + octave))
                for octave, (spacing, amplitude) in enumerate(_TEXTURE_OCTAVES)
                if (weight := _octave_weight(spacing, downsample)) > 0
            )
            hematoxylin = np.clip(0.4 + 0.5 * texture, 0, 1)
        nuclei = self._nuclei_alpha(ys, xs, downsample)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for channel in range(3):
            value = grain + _GLASS[channel]
            if has_tissue:
                eosin = _EOSIN[channel] - _GLASS[channel]
                value += tissue * (eosin + hematoxylin * (_HEMATOXYLIN[channel] - _EOSIN[channel]))
            if nuclei is not None:
                value += nuclei * (_NUCLEUS[channel] - value)
            np.clip(value + 0.5, 0, 255, out=value)
            out[..., channel] = value  # truncating the non-negative value + 0.5 rounds it
        return out

    def tissue_alpha(self, ys: np.ndarray, xs: np.ndarray, downsample: float) -> np.ndarray:
        """Tissue coverage in ``[0, 1]`` at level-0 coordinates ``ys x xs`` (outer product)."""
        field = sum(
            amplitude * _value_noise(ys, xs, self._blob_spacing * scale, _key(self.seed, octave))
            for octave, (scale, amplitude) in enumerate(((1.0, 1.0), (0.5, 0.5), (0.25, 0.25)))
            if _octave_weight(self._blob_spacing * scale, downsample) > 0
        )
        centre_y = ((ys / self.height - 0.5) * 2).astype(np.float32) ** 2
        centre_x = ((xs / self.width - 0.5) * 2).astype(np.float32) ** 2
        # bias towards the centre, then a soft edge: smoothstep of the field around 0
        edge = field + 0.9 * (0.45 - centre_y[:, None] - centre_x[None, :])
        edge *= 1 / 0.12
        edge += 0.5
        np.clip(edge, 0, 1, out=edge)
        return edge * edge * (3 - 2 * edge)

    def tissue_mask(self, downsample: int) -> np.ndarray:
        """``uint8`` mask (255 = tissue) at ``downsample``, ``ceil(size / downsample)`` pixels."""
        ys = (np.arange(-(-self.height // downsample)) + 0.5) * downsample
        xs = (np.arange(-(-self.width // downsample)) + 0.5) * downsample
        return np.where(self.tissue_alpha(ys, xs, downsample) > 0.5, 255, 0).astype(np.uint8)

    def lesion_labels(self, top: int, left: int, height: int, width: int, downsample: int) -> np.ndarray:
        """``uint8 [height, width]``: 1 where a pixel's centre (level-0 coordinates) lies inside a lesion's disc."""
        ys = (np.arange(top, top + height) + 0.5) * downsample
        xs = (np.arange(left, left + width) + 0.5) * downsample
        labels = np.zeros((height, width), dtype=np.uint8)
        for lesion in self.lesions:
            inside = (ys[:, None] - lesion.center_y) ** 2 + (xs[None, :] - lesion.center_x) ** 2 < lesion.radius**2
            labels[inside] = 1
        return labels

    def _place_lesion(self, rng: np.random.Generator, lesion_radius: float) -> Lesion:
        radius = lesion_radius * rng.uniform(0.6, 1.0)
        best, best_tissue = None, -1.0
        for _ in range(200):
            margin_y = min(radius, self.height / 2)
            margin_x = min(radius, self.width / 2)
            y = rng.uniform(margin_y, self.height - margin_y)
            x = rng.uniform(margin_x, self.width - margin_x)
            tissue = float(self.tissue_alpha(np.array([y]), np.array([x]), 1.0)[0, 0])
            if tissue > best_tissue:
                best, best_tissue = (y, x), tissue
            if tissue > 0.95:
                break
        assert best is not None
        return Lesion(float(best[0]), float(best[1]), float(radius))

    def _nuclei_alpha(self, ys: np.ndarray, xs: np.ndarray, downsample: float) -> np.ndarray | None:
        """Darkness of the lesion nuclei, each a Gaussian pre-filtered to the level's pixel size.

        Each Gaussian is cut to zero beyond 4 sigma and summed in a fixed order, so a pixel's value
        does not depend on which tile it is rendered in.
        """
        if not self._nuclei_sigma.size:
            return None
        variance = self._nuclei_sigma**2 + (downsample**2 - 1) / 4
        reach = 4 * np.sqrt(variance)
        near = np.flatnonzero(
            (self._nuclei_y + reach > ys[0])
            & (self._nuclei_y - reach < ys[-1])
            & (self._nuclei_x + reach > xs[0])
            & (self._nuclei_x - reach < xs[-1])
        )
        if not near.size:
            return None
        darkness = np.zeros((ys.size, xs.size), dtype=np.float32)
        for nucleus in near:
            along_y = _truncated_gaussian(ys - self._nuclei_y[nucleus], variance[nucleus], reach[nucleus])
            along_x = _truncated_gaussian(xs - self._nuclei_x[nucleus], variance[nucleus], reach[nucleus])
            amplitude = 0.9 * self._nuclei_sigma[nucleus] ** 2 / variance[nucleus]
            darkness += np.outer(amplitude * along_y, along_x).astype(np.float32)
        return np.minimum(darkness, 1.0, out=darkness)


def _truncated_gaussian(offsets: np.ndarray, variance: float, reach: float) -> np.ndarray:
    return np.where(np.abs(offsets) < reach, np.exp(-(offsets**2) / (2 * variance)), 0.0)


def _rendered_levels(
    pool: ThreadPoolExecutor,
    render: Callable[[int, int, int, int, int], np.ndarray],
    level_shapes: list[tuple[int, int]],
    tile: int,
    workers: int,
) -> Callable[[int], Iterator[np.ndarray]]:
    """``level -> tiles`` for :func:`write_tiff_pyramid`: ``render(top, left, height, width, downsample)``
    of each tile of the level, row-major, rendered on ``pool`` (a few tiles ahead, bounded memory)."""

    def level_tiles(level: int) -> Iterator[np.ndarray]:
        level_height, level_width = level_shapes[level]
        corners = [(y, x) for y in range(0, level_height, tile) for x in range(0, level_width, tile)]
        render_tile = functools.partial(_render_tile, render, tile, level_shapes[level], 2**level)
        return _ordered_map(pool, render_tile, corners, lookahead=4 * workers)

    return level_tiles


def _render_tile(
    render: Callable[[int, int, int, int, int], np.ndarray],
    tile: int,
    level_shape: tuple[int, int],
    downsample: int,
    corner: tuple[int, int],
) -> np.ndarray:
    top, left = corner
    return render(top, left, min(tile, level_shape[0] - top), min(tile, level_shape[1] - left), downsample)


def _pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > tile and shapes[-1][0] % 2 == 0 and shapes[-1][1] % 2 == 0:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return shapes


def _octave_weight(spacing: float, downsample: float) -> float:
    """1 for noise octaves well above the pixel size, fading to 0 near Nyquist (no aliasing)."""
    return float(np.clip(spacing / downsample / 2 - 1, 0, 1))


def _key(seed: int, stream: int) -> int:
    return _splitmix64((seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & _MASK64)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _hash_uniform(rows: np.ndarray, cols: np.ndarray, key: int) -> np.ndarray:
    """Values uniform in ``[-1, 1)``, a pure function of integer lattice coordinates and ``key``."""
    with np.errstate(over="ignore"):
        value = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            cols.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        value ^= np.uint64(key)
        value ^= value >> np.uint64(30)
        value *= np.uint64(0xBF58476D1CE4E5B9)
        value ^= value >> np.uint64(27)
        value *= np.uint64(0x94D049BB133111EB)
        value ^= value >> np.uint64(31)
    return (value >> np.uint64(40)).astype(np.float32) / np.float32(2**23) - 1


def _value_noise(ys: np.ndarray, xs: np.ndarray, spacing: float, key: int) -> np.ndarray:
    """Smooth value noise in ``[-1, 1]`` with lattice ``spacing``, evaluated on the grid ``ys x xs``.

    Separable smoothstep interpolation of hashed lattice values: rows first, then columns (plain
    gathers; no BLAS, whose threads would fight the tile-rendering threads).
    """
    row_cell, row_weight = _lattice_cells(ys, spacing)
    col_cell, col_weight = _lattice_cells(xs, spacing)
    first_row, first_col = int(row_cell[0]), int(col_cell[0])
    lattice = _hash_uniform(
        np.arange(first_row, int(row_cell[-1]) + 2)[:, None],
        np.arange(first_col, int(col_cell[-1]) + 2)[None, :],
        key,
    )
    row_cell, col_cell = row_cell - first_row, col_cell - first_col
    rows = lattice[row_cell] + row_weight[:, None] * (lattice[row_cell + 1] - lattice[row_cell])
    return rows[:, col_cell] + col_weight * (rows[:, col_cell + 1] - rows[:, col_cell])


def _lattice_cells(coords: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell of each (increasing) coordinate and the smoothstep weight of its far corner."""
    position = coords / spacing
    cell = np.floor(position).astype(np.int64)
    fraction = (position - cell).astype(np.float32)
    return cell, fraction * fraction * (3 - 2 * fraction)


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def _ordered_map(
    pool: ThreadPoolExecutor, func: Callable[[_Item], _Result], items: Iterable[_Item], lookahead: int
) -> Iterator[_Result]:
    """``map(func, items)`` on ``pool``, in order, with at most ``lookahead`` results pending (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(func, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
