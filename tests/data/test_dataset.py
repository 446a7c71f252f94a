"""SlideDataset: lazy, deterministic samples of cropped, stride-aligned, augmented slides."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from lightstream.core.source import ImageSource, TensorSource
from lightstream.data import (
    Augmentation,
    Box,
    ColorJitterView,
    SlideDataset,
    SlideRecord,
    SlideSample,
    SyntheticSlide,
    collate_single,
    open_slide,
    tissue_box,
)

AUGMENT = Augmentation(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)


def _read_all(source: ImageSource) -> torch.Tensor:
    return source.read(slice(None), slice(None))


def _records(lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide) -> list[SlideRecord]:
    return [SlideRecord(lesion_slide.path, 1), SlideRecord(plain_slide.path, 0)]


def test_samples_are_lazy_sources_of_the_tissue_with_their_labels(
    lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide
) -> None:
    dataset = SlideDataset(_records(lesion_slide, plain_slide), level=1)
    assert len(dataset) == 2
    sample = dataset[0]
    try:
        assert isinstance(sample.image, ImageSource)
        assert sample.label.dtype == torch.int64 and sample.label.item() == 1
        with open_slide(lesion_slide.path, level=1) as slide:
            expected_box = tissue_box(slide)
            assert sample.box == expected_box
            assert torch.equal(
                _read_all(sample.image),
                slide.read(slice(expected_box.top, expected_box.bottom), slice(expected_box.left, expected_box.right)),
            )
    finally:
        sample.close()


@pytest.mark.parametrize("stride", [16, 64, 100])
def test_stride_makes_the_image_a_multiple_of_it_around_the_tissue(
    lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide, stride: int
) -> None:
    sample = SlideDataset(_records(lesion_slide, plain_slide), stride=stride, augmentation=AUGMENT)[1]
    with sample.slide:
        _, _, height, width = sample.image.shape
        assert height % stride == 0 and width % stride == 0
        tissue = tissue_box(sample.slide)
        assert tissue is not None
        box = sample.box
        assert box.top <= tissue.top and box.left <= tissue.left
        assert box.bottom >= tissue.bottom and box.right >= tissue.right


def test_without_cropping_the_sample_is_the_whole_level(lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide) -> None:
    sample = SlideDataset(_records(lesion_slide, plain_slide), mpp=2.0, crop_to_tissue=False)[0]
    with sample.slide:
        assert sample.slide.level == 2
        assert sample.box == Box(0, 0, 256, 384)
        assert torch.equal(_read_all(sample.image), _read_all(sample.slide))


def test_augmented_sample_equals_augmenting_the_loaded_crop(lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide) -> None:
    dataset = SlideDataset(_records(lesion_slide, plain_slide), level=2, augmentation=AUGMENT, seed=4)
    for index in range(2):
        sample = dataset[index]
        with sample.slide:
            crop = sample.slide.crop(sample.box)
            expected = _read_all(crop)
            if sample.flipped:
                expected = torch.flip(expected, [3])
            expected = torch.rot90(expected, sample.quarter_turns, dims=(2, 3))
            expected = _read_all(ColorJitterView(TensorSource(expected), sample.jitter))  # tested in test_views
            assert torch.equal(_read_all(sample.image), expected)


def test_the_same_seed_epoch_and_index_give_identical_pixels_on_every_read(
    lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide
) -> None:
    records = _records(lesion_slide, plain_slide)
    first = SlideDataset(records, level=2, augmentation=AUGMENT, seed=11)[0]
    second = SlideDataset(records, level=2, augmentation=AUGMENT, seed=11)[0]
    with first.slide, second.slide:
        pixels = _read_all(first.image)
        assert torch.equal(_read_all(first.image), pixels)  # forward and backward read the same
        assert torch.equal(_read_all(second.image), pixels)  # and so does a fresh dataset


def test_set_epoch_draws_new_augmentations(lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide) -> None:
    dataset = SlideDataset(_records(lesion_slide, plain_slide), level=3, augmentation=AUGMENT)
    draws = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        draws.add((sample.quarter_turns, sample.flipped, sample.jitter))
        sample.close()
    assert len(draws) == 8


def test_mask_crops_the_region_and_is_oriented_like_the_image(tmp_path: Path, lesion_slide: SyntheticSlide) -> None:
    # The mask is the slide's own level 3 (8x smaller), so the oriented mask must equal the oriented level-3 image.
    with open_slide(lesion_slide.path, level=3) as level3:
        small = _read_all(level3)[0, 0].numpy()
    roi = np.zeros_like(small)
    roi[4:100, 10:150] = small[4:100, 10:150]
    mask_path = tmp_path / "roi.tif"
    tifffile.imwrite(mask_path, roi)
    dataset = SlideDataset([SlideRecord(lesion_slide.path, 1, mask_path)], augmentation=AUGMENT, seed=1)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        sample.close()
        assert sample.box == Box(32, 80, 800, 1200)  # mask rows 4..99, cols 10..149, times 8
        expected = torch.from_numpy(small[4:100, 10:150].copy())
        if sample.flipped:
            expected = torch.flip(expected, [1])
        expected = torch.rot90(expected, sample.quarter_turns)
        assert sample.mask is not None
        assert torch.equal(sample.mask[0], expected)
        assert sample.mask.shape[1] * 8 == sample.image.shape[2] and sample.mask.shape[2] * 8 == sample.image.shape[3]


def test_collate_single_passes_one_sample_and_rejects_larger_batches(
    lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide
) -> None:
    dataset = SlideDataset(_records(lesion_slide, plain_slide), level=2)
    batches = list(DataLoader(dataset, batch_size=1, collate_fn=collate_single))
    assert [type(batch) for batch in batches] == [SlideSample, SlideSample]
    assert [batch.label.item() for batch in batches] == [1, 0]
    unbatched = next(iter(DataLoader(dataset, batch_size=None)))
    assert isinstance(unbatched, SlideSample)
    for batch in [*batches, unbatched]:
        batch.close()
    with pytest.raises(ValueError, match="one at a time; use batch_size=1"):
        collate_single([batches[0], batches[1]])


def test_samples_survive_pickling_for_dataloader_workers(lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide) -> None:
    sample = SlideDataset(_records(lesion_slide, plain_slide), level=2, augmentation=AUGMENT, stride=32)[0]
    clone = pickle.loads(pickle.dumps(sample))
    with sample.slide, clone.slide:
        assert torch.equal(_read_all(clone.image), _read_all(sample.image))


def test_float_labels_become_float_tensors(lesion_slide: SyntheticSlide) -> None:
    sample = SlideDataset([SlideRecord(lesion_slide.path, 0.25)], level=3, crop_to_tissue=False)[0]
    sample.close()
    assert sample.label.dtype == torch.float32 and sample.label.item() == 0.25
