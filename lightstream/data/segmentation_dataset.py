"""Whole slides with their label masks, as lazy (image, target) pairs for segmentation.

:class:`SegmentationSlideDataset` is a :class:`~lightstream.data.SlideDataset` whose samples also
carry ``target``: the record's label mask read on the image's pixel grid
(:class:`~lightstream.data.LabelMask`), cut to the same tissue box and flipped/rotated by the same
views as the image, so ``sample.target.read(rows, cols)`` labels ``sample.image.read(rows, cols)``
pixel for pixel. Colour jitter touches the image only. Batches hold one slide, as for classification:
``DataLoader(dataset, batch_size=1, collate_fn=collate_single)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lightstream.core.source import ImageSource
from lightstream.data.dataset import SlideDataset, SlideRecord, SlideSample, orient
from lightstream.data.masks import LabelMask, open_label_mask
from lightstream.data.views import CropView

__all__ = ["SegmentationSample", "SegmentationSlideDataset"]


@dataclass
class SegmentationSample(SlideSample):
    """A :class:`~lightstream.data.SlideSample` with its per-pixel target.

    Attributes:
        target: lazy ``[1, 1, H, W]`` class indices aligned with ``image`` (same shape, same
            orientation); pixels the crop adds beyond the slide read as the dataset's ``mask_fill``.
        label_mask: the opened mask under ``target``; :meth:`close` releases it with the slide.
    """

    target: ImageSource = field(kw_only=True)
    label_mask: LabelMask = field(kw_only=True)

    def close(self) -> None:
        """Release the slide and mask files."""
        super().close()
        self.label_mask.close()


class SegmentationSlideDataset(SlideDataset):
    """Slides and their label masks (the table's ``label_mask`` column) as lazy (image, target) samples.

    Args:
        records: the table, as records (each with ``label_mask_path``) or the path of a CSV with a
            ``label_mask`` column (see :func:`~lightstream.data.read_slide_table`).
        mask_fill: label of target pixels outside the slide (where ``stride`` padding reaches past
            its edge); e.g. the ignore index of the loss.
        **options: everything else of :class:`~lightstream.data.SlideDataset` (``level``/``mpp``,
            ``crop_to_tissue``, ``tissue_margin``, ``stride``, ``augmentation``, ``seed``, ...).
    """

    def __init__(self, records: Sequence[SlideRecord] | str | Path, mask_fill: int = 0, **options: Any) -> None:
        super().__init__(records, **options)
        missing = [str(record.path) for record in self.records if record.label_mask_path is None]
        if missing:
            raise ValueError(
                f"{len(missing)} slide(s) have no label mask, e.g. {missing[0]}: a segmentation dataset needs one "
                "per slide (a label_mask column in the table, or SlideRecord(..., label_mask_path=...))"
            )
        self.mask_fill = mask_fill

    def __getitem__(self, index: int) -> SegmentationSample:
        sample = super().__getitem__(index)
        try:
            label_mask = open_label_mask(self.records[index].label_mask_path, sample.slide)  # type: ignore[arg-type]
        except BaseException:
            sample.close()
            raise
        target = orient(CropView(label_mask, sample.box, self.mask_fill), sample.flipped, sample.quarter_turns)
        values = {item.name: getattr(sample, item.name) for item in fields(SlideSample)}
        return SegmentationSample(**values, target=target, label_mask=label_mask)
