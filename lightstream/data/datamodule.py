"""SlideDataModule: a table of slides and labels as Lightning train/val/test/predict loaders.

The table (see :func:`~lightstream.data.dataset.read_slide_table`) is read and checked when the
module is built, so a missing file, an unknown or empty label or a duplicate slide fails before
any training starts, naming the row. Rows keep the split the table gives them (``split``
column); the others are split by a seeded split stratified by label. Every loader yields one
lazy :class:`~lightstream.data.dataset.SlideSample` per step (``batch_size=None``), which the
streaming models take as it is.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Sampler

from lightstream.data.dataset import Augmentation, SlideDataset, SlideRecord, read_slide_table
from lightstream.data.errors import SlideTableError

__all__ = ["SlideDataModule", "stratified_split"]

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]


class SlideDataModule(L.LightningDataModule):
    """Slides listed in a CSV table, split into train / val / test, read lazily at one level.

    Args:
        table: CSV with columns ``path,label`` and optionally ``mask`` and ``split``; paths are
            relative to the table's folder.
        classes: class names in index order (``["normal", "tumour"]``); labels may then be names.
            Without it labels must be class indices ``0, 1, ...``.
        level: pyramid level to read, or
        mpp: micrometres per pixel to read at (the closest level not coarser); neither: level 0.
        crop_to_tissue: crop each slide to its tissue (or mask) bounding box.
        tissue_margin: pixels of the read level kept around the tissue box.
        size_multiple: grow each crop to a multiple of this (e.g. the trunk's output stride),
            padding with white where the slide ends; ``None`` keeps the sizes.
        augmentation: random flips, rotations and colour jitter of training slides, or ``None``.
        val_fraction, test_fraction: share of each label's unassigned rows put in val / test.
        seed: seed of the split, of the training order and of the augmentations.
        num_workers: DataLoader worker processes (slides reopen by path in each).
        balanced_sampling: draw training slides with replacement, each class equally often.
        predict_split: the split ``predict`` runs over; ``None``: every slide of the table.
        thumbnail_size: longer side of the thumbnail tissue is detected on.
    """

    def __init__(
        self,
        table: str,
        classes: list[str] | None = None,
        level: int | None = None,
        mpp: float | None = None,
        crop_to_tissue: bool = True,
        tissue_margin: int = 0,
        size_multiple: int | None = None,
        augmentation: Augmentation | None = Augmentation(),
        val_fraction: float = 0.25,
        test_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
        balanced_sampling: bool = False,
        predict_split: Split | None = None,
        thumbnail_size: int = 1024,
    ) -> None:
        super().__init__()
        if level is not None and mpp is not None:
            raise ValueError(f"give the data either level= or mpp=, not both (got level={level}, mpp={mpp})")
        self.table = table
        self.classes = classes
        self.records = _with_class_indices(read_slide_table(table, classes), table)
        self.splits = stratified_split(self.records, val_fraction, test_fraction, seed)
        self.options = dict(level=level, mpp=mpp, crop_to_tissue=crop_to_tissue, tissue_margin=tissue_margin,
                            stride=size_multiple, seed=seed, thumbnail_size=thumbnail_size)
        self.augmentation = augmentation
        self.seed = seed
        self.num_workers = num_workers
        self.balanced_sampling = balanced_sampling
        self.predict_split = predict_split
        counts = {split: len(records) for split, records in self.splits.items()}
        logger.info("%s: %d slides, %s", table, len(self.records), counts)

    @property
    def num_classes(self) -> int:
        """``len(classes)``, or one more than the largest label index."""
        if self.classes is not None:
            return len(self.classes)
        return max(int(record.label) for record in self.records) + 1

    def dataset(self, split: Split | None) -> SlideDataset:
        """The slides of ``split`` (``None``: all), augmented only for ``"train"``."""
        records = self.records if split is None else self.splits[split]
        return SlideDataset(records, augmentation=self.augmentation if split == "train" else None, **self.options)

    def train_dataloader(self) -> DataLoader:
        dataset = self._non_empty("train")
        sampler = _SlideSampler(dataset, self.seed, self.balanced_sampling)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._non_empty("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._non_empty("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.predict_split) if self.predict_split else self.dataset(None))

    def _non_empty(self, split: Split) -> SlideDataset:
        dataset = self.dataset(split)
        if not len(dataset):
            raise ValueError(f"{self.table}: the {split} split has no slides; mark rows {split} in the table's "
                             f"split column{'' if split == 'train' else f' or raise {split}_fraction'}")
        return dataset

    def _loader(self, dataset: SlideDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers)


def stratified_split(records: Sequence[SlideRecord], val_fraction: float = 0.25, test_fraction: float = 0.0,
                     seed: int = 0) -> dict[str, list[SlideRecord]]:
    """Records by split: those with a ``split`` keep it; the rest are split per label, seeded.

    Of each label's unassigned records, ``round(n * fraction)`` go to val and to test (at least
    one each when the fraction is positive and the label has two or more), the rest to train.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be >= 0 and sum to less than 1, got "
                         f"{val_fraction} and {test_fraction}")
    splits: dict[str, list[SlideRecord]] = {"train": [], "val": [], "test": []}
    unassigned: dict[float, list[SlideRecord]] = {}
    for record in records:
        if record.split is not None:
            splits[record.split].append(record)
        else:
            unassigned.setdefault(record.label, []).append(record)
    rng = np.random.default_rng(seed)
    for label in sorted(unassigned):
        group = [unassigned[label][i] for i in rng.permutation(len(unassigned[label]))]
        counts = [_share(len(group), fraction) for fraction in (val_fraction, test_fraction)]
        splits["val"] += [replace(r, split="val") for r in group[: counts[0]]]
        splits["test"] += [replace(r, split="test") for r in group[counts[0] : counts[0] + counts[1]]]
        splits["train"] += [replace(r, split="train") for r in group[counts[0] + counts[1] :]]
    return splits


def _share(count: int, fraction: float) -> int:
    if fraction <= 0 or count < 2:
        return 0
    return min(max(1, round(count * fraction)), count - 1)


def _with_class_indices(records: list[SlideRecord], table: str) -> list[SlideRecord]:
    """The records, checked to have class-index labels (``0, 1, ...``)."""
    problems = [f"line {line}: label {record.label!r} is not a class index 0, 1, ... (or give classes=)"
                for line, record in enumerate(records, start=2)
                if isinstance(record.label, float) or record.label < 0]
    if problems:
        raise SlideTableError(table, problems)
    return records


class _SlideSampler(Sampler[int]):
    """Training order of one epoch, seeded by ``(seed, epoch)``: a permutation, or with ``balanced``
    draws with replacement weighted so each class comes equally often. Lightning calls
    :meth:`set_epoch` every epoch, which also moves the dataset's augmentations on."""

    def __init__(self, dataset: SlideDataset, seed: int, balanced: bool) -> None:
        self.dataset, self.seed, self.balanced, self.epoch = dataset, seed, balanced, 0
        labels = [record.label for record in dataset.records]
        counts = Counter(labels)
        weights = np.array([1 / counts[label] for label in labels])
        self.probabilities = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        count = len(self.dataset)
        order = rng.choice(count, count, p=self.probabilities) if self.balanced else rng.permutation(count)
        return iter(order.tolist())
