"""A map-style dataset of whole slides that yields lazy image sources for the streaming engine.

Each sample's ``image`` is a lazy :class:`~lightstream.core.source.ImageSource` (a slide level,
cropped to tissue, optionally padded to a multiple of the engine's stride, flipped, rotated and
colour-jittered as views), so no whole slide is ever decoded by the dataset. Augmentation
parameters are drawn once per sample from ``(seed, epoch, index)``, which makes every read of a
sample return the same pixels, as the engine's forward and backward passes require.

Batches hold one slide: use ``DataLoader(dataset, batch_size=None)`` or
``DataLoader(dataset, batch_size=1, collate_fn=collate_single)``. Worker processes are fine;
samples pickle by path and reopen the slide.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightstream.core.source import ImageSource
from lightstream.data.errors import MaskMismatchError, SlideNotFoundError, UnsupportedSlideError
from lightstream.data.geometry import Box, clip_box, fit_box_to_multiple, scale_box
from lightstream.data.slide import Slide, open_slide
from lightstream.data.tissue import mask_box, tissue_box
from lightstream.data.views import ColorJitter, ColorJitterView, FlipView, Rot90View

__all__ = [
    "SlideRecord",
    "Augmentation",
    "SlideSample",
    "SlideDataset",
    "collate_single",
    "orient",
    "read_slide_table",
    "write_slide_table",
    "read_mask",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideRecord:
    """One row of a slide table: the slide, its label, optionally a region-of-interest mask and a label mask.

    ``mask_path`` marks where to look (non-zero = tissue to use; it sets the crop); ``label_mask_path``
    is a per-pixel class map for segmentation (see :class:`~lightstream.data.SegmentationSlideDataset`).
    """

    path: Path
    label: int | float
    mask_path: Path | None = None
    label_mask_path: Path | None = None


@dataclass(frozen=True)
class Augmentation:
    """Random large-image augmentations, all applied lazily per tile.

    Attributes:
        flips: mirror left-right with probability 1/2.
        rotations: rotate by a uniformly drawn number of quarter turns (with ``flips``: all 8 orientations).
        brightness, contrast, saturation, hue: ranges of :meth:`ColorJitter.sample`; all 0 disables jitter.
    """

    flips: bool = True
    rotations: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02

    @property
    def jitters_colour(self) -> bool:
        """Whether any colour range is non-zero."""
        return any((self.brightness, self.contrast, self.saturation, self.hue))


@dataclass
class SlideSample:
    """One item of a :class:`SlideDataset`.

    Attributes:
        image: lazy ``[1, 3, H, W]`` RGB ``uint8`` source for the engine.
        label: the label as a 0-d tensor (``int64`` for integer labels, ``float32`` otherwise).
        slide: the opened slide under ``image``; :meth:`close` releases it.
        box: the region of the slide's level that ``image`` shows, before rotation/flip.
        mask: the record's mask cropped to ``box`` and oriented like ``image``: a ``[1, h, w]`` tensor
            of the mask's values at the mask's own (low) resolution; ``None`` without a mask.
        quarter_turns: rotation applied to the crop (``torch.rot90`` convention).
        flipped: whether the crop was mirrored left-right before rotating.
        jitter: the colour jitter applied, or ``None``.
    """

    image: ImageSource
    label: torch.Tensor
    slide: Slide
    box: Box
    mask: torch.Tensor | None = None
    quarter_turns: int = 0
    flipped: bool = False
    jitter: ColorJitter | None = None

    def close(self) -> None:
        """Release the slide file."""
        self.slide.close()


class SlideDataset(Dataset):
    """Whole slides from a table of ``(slide path, label[, mask path])`` as lazy samples.

    Args:
        records: the table, as records or the path of a CSV (see :func:`read_slide_table`).
        level: pyramid level to read (default 0), or
        mpp: target micrometres per pixel (see :func:`~lightstream.data.slide.open_slide`).
        crop_to_tissue: crop each slide to the bounding box of its mask (if the record has one)
            or of the tissue found by Otsu on saturation; ``False`` keeps the whole level.
        tissue_margin: pixels (of the chosen level) added around the tissue box.
        stride: grow the region to a multiple of this (the engine's output stride), padding with
            white where the slide ends; ``None`` leaves sizes as they are.
        augmentation: random flips/rotations/colour jitter, or ``None`` for none.
        seed: seed of the augmentation draws; with :meth:`set_epoch` the draws change per epoch.
        thumbnail_size: longer side of the thumbnail tissue is detected on.
    """

    def __init__(
        self,
        records: Sequence[SlideRecord] | str | Path,
        level: int | None = None,
        mpp: float | None = None,
        crop_to_tissue: bool = True,
        tissue_margin: int = 0,
        stride: int | None = None,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        thumbnail_size: int = 1024,
    ) -> None:
        self.records = read_slide_table(records) if isinstance(records, (str, Path)) else list(records)
        self.level = level
        self.mpp = mpp
        self.crop_to_tissue = crop_to_tissue
        self.tissue_margin = tissue_margin
        self.stride = stride
        self.augmentation = augmentation
        self.seed = seed
        self.thumbnail_size = thumbnail_size
        self.epoch = 0
        self._regions: dict[int, Box] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Draw different augmentations from now on (call once per epoch, like a ``DistributedSampler``)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> SlideSample:
        record = self.records[index]
        slide = open_slide(record.path, level=self.level, mpp=self.mpp)
        try:
            mask = read_mask(record.mask_path, slide) if record.mask_path is not None else None
            if index not in self._regions:
                self._regions[index] = self._region(slide, mask)
            box = self._regions[index]
            mask_crop = _crop_mask(mask, box, slide.shape[2:]) if mask is not None else None
            quarter_turns, flipped, jitter = self._draw_augmentation(index)
            image = orient(slide.crop(box), flipped, quarter_turns)
            if mask_crop is not None:
                mask_crop = np.rot90(mask_crop[:, ::-1] if flipped else mask_crop, quarter_turns)
            if jitter is not None:
                image = ColorJitterView(image, jitter)
        except BaseException:
            slide.close()
            raise
        label_dtype = torch.int64 if isinstance(record.label, (int, np.integer)) else torch.float32
        return SlideSample(
            image=image,
            label=torch.tensor(record.label, dtype=label_dtype),
            slide=slide,
            box=box,
            mask=torch.from_numpy(np.ascontiguousarray(mask_crop))[None] if mask_crop is not None else None,
            quarter_turns=quarter_turns,
            flipped=flipped,
            jitter=jitter,
        )

    def _region(self, slide: Slide, mask: np.ndarray | None) -> Box:
        level_shape = slide.shape[2:]
        box = None
        if self.crop_to_tissue:
            if mask is not None:
                box = mask_box(mask, level_shape, self.tissue_margin)
                if box is None:
                    logger.warning("%s: its mask is empty; using the whole slide", slide.path)
            else:
                box = tissue_box(slide, margin=self.tissue_margin, max_size=self.thumbnail_size)
        if box is None:
            box = Box(0, 0, *level_shape)
        if self.stride is not None:
            box = fit_box_to_multiple(box, self.stride, level_shape)
        return box

    def _draw_augmentation(self, index: int) -> tuple[int, bool, ColorJitter | None]:
        augmentation = self.augmentation
        if augmentation is None:
            return 0, False, None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        quarter_turns = int(rng.integers(4)) if augmentation.rotations else 0
        flipped = bool(rng.random() < 0.5) if augmentation.flips else False
        jitter = None
        if augmentation.jitters_colour:
            jitter = ColorJitter.sample(
                rng, augmentation.brightness, augmentation.contrast, augmentation.saturation, augmentation.hue
            )
        return quarter_turns, flipped, jitter


def orient(source: ImageSource, flipped: bool, quarter_turns: int) -> ImageSource:
    """``source`` in a sample's orientation: mirrored left-right if ``flipped``, then turned by
    ``quarter_turns`` (``torch.rot90`` convention), as lazy views."""
    if flipped:
        source = FlipView(source, horizontal=True)
    if quarter_turns:
        source = Rot90View(source, quarter_turns)
    return source


def collate_single(batch: list[SlideSample]) -> SlideSample:
    """Collate for ``DataLoader(batch_size=1)``: the engine streams one slide at a time."""
    if len(batch) != 1:
        raise ValueError(
            f"slides are streamed one at a time; use batch_size=1 (or batch_size=None), got a batch of {len(batch)}"
        )
    return batch[0]


def read_slide_table(csv_path: str | Path) -> list[SlideRecord]:
    """Read a CSV with columns ``path``, ``label`` and optionally ``mask`` and ``label_mask``.

    Relative paths are relative to the CSV's folder; an empty ``mask`` / ``label_mask`` cell means none. Labels
    that parse as integers stay integers, others become floats.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"slide table not found: {csv_path}")
    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"slide table {csv_path} lacks column(s) {sorted(missing)}; it has {reader.fieldnames}"
            )
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                label: int | float = int(row["label"])
            except ValueError:
                try:
                    label = float(row["label"])
                except ValueError:
                    raise ValueError(f"{csv_path}, line {line}: label {row['label']!r} is not a number") from None
            mask = row.get("mask") or None
            label_mask = row.get("label_mask") or None
            records.append(
                SlideRecord(
                    csv_path.parent / row["path"],
                    label,
                    csv_path.parent / mask if mask is not None else None,
                    csv_path.parent / label_mask if label_mask is not None else None,
                )
            )
    return records


def write_slide_table(csv_path: str | Path, records: Sequence[SlideRecord]) -> None:
    """Write records as a CSV readable by :func:`read_slide_table`, paths relative to its folder where possible."""
    csv_path = Path(csv_path)
    with_masks = any(record.mask_path is not None for record in records)
    with_label_masks = any(record.label_mask_path is not None for record in records)
    with csv_path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label"] + ["mask"] * with_masks + ["label_mask"] * with_label_masks)
        for record in records:
            row = [_relative_to(record.path, csv_path.parent), record.label]
            if with_masks:
                row.append(_relative_to(record.mask_path, csv_path.parent) if record.mask_path is not None else "")
            if with_label_masks:
                row.append(
                    _relative_to(record.label_mask_path, csv_path.parent) if record.label_mask_path is not None else ""
                )
            writer.writerow(row)


def read_mask(path: str | Path, slide: Slide) -> np.ndarray:
    """Read a region-of-interest mask (non-zero = use) and check it covers ``slide``.

    The mask may be smaller than the slide (any uniform downsample of level 0); it must have the
    slide's aspect ratio up to one mask pixel of rounding. TIFFs are read with tifffile, other
    image formats with Pillow; of a multi-channel mask the first channel counts.

    Raises:
        SlideNotFoundError: the mask file does not exist.
        UnsupportedSlideError: it cannot be read as an image.
        MaskMismatchError: its size or aspect ratio does not match the slide.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideNotFoundError(path, f"mask file not found: {path} (mask of slide {slide.path})")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            mask = tifffile.imread(path)
        else:
            with Image.open(path) as image:
                mask = np.asarray(image)
    except Exception as exc:
        raise UnsupportedSlideError(path, f"cannot read mask {path}: {exc}") from exc
    mask = np.squeeze(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise UnsupportedSlideError(path, f"mask {path} is not a 2-D image: its shape is {mask.shape}")
    _check_mask_matches(path, mask.shape, slide)
    return mask


def _check_mask_matches(path: Path, mask_shape: tuple[int, ...], slide: Slide) -> None:
    """A common scale ``s >= 1`` must map level 0 onto the mask to within one mask pixel per side."""
    slide_height, slide_width = slide.level_shapes[0]
    mask_height, mask_width = mask_shape
    low = max(slide_height / (mask_height + 1), slide_width / (mask_width + 1), 1.0)
    high = min(
        slide_height / (mask_height - 1) if mask_height > 1 else float("inf"),
        slide_width / (mask_width - 1) if mask_width > 1 else float("inf"),
    )
    if low <= high:
        return
    if mask_height > slide_height + 1 or mask_width > slide_width + 1:
        reason = "it is larger than the slide's full resolution"
    else:
        reason = (
            f"their aspect ratios differ ({mask_width / mask_height:.4f} vs {slide_width / slide_height:.4f}, "
            "width/height), so no single downsample maps one onto the other"
        )
    raise MaskMismatchError(
        path,
        slide.path,
        f"mask {path} ({mask_width}x{mask_height} px) does not match slide {slide.path} "
        f"({slide_width}x{slide_height} px at level 0): {reason}",
    )


def _crop_mask(mask: np.ndarray, box: Box, level_shape: tuple[int, int]) -> np.ndarray:
    """The part of ``mask`` under ``box`` (level pixels), zero where the box leaves the slide."""
    in_mask = scale_box(box, mask.shape[0] / level_shape[0], mask.shape[1] / level_shape[1])
    inside = clip_box(in_mask, *mask.shape)
    out = np.zeros((in_mask.height, in_mask.width), dtype=mask.dtype)
    top, left = inside.top - in_mask.top, inside.left - in_mask.left
    out[top : top + inside.height, left : left + inside.width] = mask[
        inside.top : inside.bottom, inside.left : inside.right
    ]
    return out


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(Path(path).resolve())
