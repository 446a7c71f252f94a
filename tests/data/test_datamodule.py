"""SlideDataModule: checks the table when built, splits it seeded and stratified, samples and augments per epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lightstream.data import SlideRecord, SlideTableError, write_slide_table
from lightstream.data.datamodule import SlideDataModule, stratified_split


def _table(folder: Path, labels: list[int], splits: list[str | None] | None = None) -> Path:
    records = []
    for index, label in enumerate(labels):
        path = folder / f"s{index}.tif"
        path.write_bytes(b"")  # the module only reads the table; slides are opened by the loaders
        records.append(SlideRecord(path, label, split=splits[index] if splits else None))
    write_slide_table(folder / "labels.csv", records)
    return folder / "labels.csv"


def test_a_bad_table_fails_when_the_module_is_built(tmp_path: Path) -> None:
    table = _table(tmp_path, [0, 1])
    table.write_text(table.read_text() + "gone.tif,1\ns0.tif,2.5\n")
    with pytest.raises(SlideTableError) as raised:
        SlideDataModule(str(table))
    assert raised.value.problems == [f"line 4: slide file not found: {tmp_path / 'gone.tif'}",
                                     "line 5: slide 's0.tif' is listed twice (also on line 2)"]


def test_labels_must_be_class_indices_without_class_names(tmp_path: Path) -> None:
    table = _table(tmp_path, [0, 1])
    table.write_text("path,label\ns0.tif,0.5\ns1.tif,1\n")
    with pytest.raises(SlideTableError, match=r"line 2: label 0.5 is not a class index"):
        SlideDataModule(str(table))


def test_the_split_is_stratified_seeded_and_keeps_the_tables_own_splits(tmp_path: Path) -> None:
    labels = [0] * 8 + [1] * 4 + [0, 1]
    table = _table(tmp_path, labels, [None] * 12 + ["test", "val"])
    module = SlideDataModule(str(table), val_fraction=0.25, test_fraction=0.25, seed=3)
    counts = {split: Counter(r.label for r in records) for split, records in module.splits.items()}
    assert counts == {"train": {0: 4, 1: 2}, "val": {0: 2, 1: 2}, "test": {0: 3, 1: 1}}
    assert "s12.tif" in [r.path.name for r in module.splits["test"]]
    assert "s13.tif" in [r.path.name for r in module.splits["val"]]
    again = SlideDataModule(str(table), val_fraction=0.25, test_fraction=0.25, seed=3)
    assert again.splits == module.splits
    other = stratified_split(module.records, 0.25, 0.25, seed=4)
    assert other != module.splits and {k: len(v) for k, v in other.items()} == {"train": 6, "val": 4, "test": 4}
    assert module.num_classes == 2


def test_balanced_sampling_draws_each_class_about_equally_and_epochs_differ(tmp_path: Path) -> None:
    table = _table(tmp_path, [0] * 18 + [1] * 2)
    module = SlideDataModule(str(table), val_fraction=0.0, balanced_sampling=True)
    sampler = module.train_dataloader().sampler
    draws = []
    for epoch in range(50):
        sampler.set_epoch(epoch)
        draws += [module.splits["train"][i].label for i in sampler]
    assert sampler.dataset.epoch == 49  # set_epoch moves the augmentations on too
    share = sum(draws) / len(draws)
    assert 0.4 < share < 0.6, share  # 1 in 10 without balancing
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_only_training_slides_are_augmented_and_predict_covers_the_table(tmp_path: Path) -> None:
    table = _table(tmp_path, [0, 0, 1, 1])
    module = SlideDataModule(str(table), val_fraction=0.5)
    assert module.train_dataloader().dataset.augmentation is not None
    assert module.val_dataloader().dataset.augmentation is None
    assert len(module.predict_dataloader().dataset) == 4
    with pytest.raises(ValueError, match="the test split has no slides"):
        module.test_dataloader()
