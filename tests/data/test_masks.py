"""Label masks as lazy sources on a slide level's grid, and segmentation datasets that turn image and mask alike."""

from __future__ import annotations

import csv
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightstream.core.source import ImageSource, TensorSource
from lightstream.data import (
    Augmentation,
    ColorJitterView,
    LabelMask,
    MaskMismatchError,
    SegmentationSample,
    SegmentationSlideDataset,
    SegmentationWriter,
    SlideNotFoundError,
    SlideRecord,
    SyntheticSlide,
    UnsupportedSlideError,
    collate_single,
    open_label_mask,
    open_slide,
    read_slide_table,
    write_segmentation,
    write_synthetic_dataset,
    write_synthetic_slide,
)

DARK_RED = 110
"""Red below this only at nucleus cores (tissue stays above 150): the lesion pixels an image shows."""


@pytest.fixture(scope="module")
def masked_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 1024 x 1536 lossless slide with 2 lesions and its lesion mask; 4 levels (1024 .. 128 px tall)."""
    folder = tmp_path_factory.mktemp("masked")
    return write_synthetic_slide(
        folder / "slide.tif", size=(1024, 1536), lesions=2, seed=3, compression="zlib", mask_path=folder / "labels.tif"
    )


def _whole(source: ImageSource) -> torch.Tensor:
    return source.read(slice(None), slice(None))


def _inside_lesions(info: SyntheticSlide, shape: tuple[int, int], downsample: int) -> np.ndarray:
    """1 where a level pixel's centre (level-0 coordinates) lies inside a lesion disc, computed afresh."""
    ys = (np.arange(shape[0]) + 0.5) * downsample
    xs = (np.arange(shape[1]) + 0.5) * downsample
    inside = np.zeros(shape, dtype=bool)
    for lesion in info.lesions:
        inside |= np.hypot(ys[:, None] - lesion.center_y, xs[None, :] - lesion.center_x) < lesion.radius
    return inside.astype(np.uint8)


def _tiles(height: int, width: int, size: tuple[int, int]) -> list[tuple[slice, slice]]:
    return [
        (slice(top, min(top + size[0], height)), slice(left, min(left + size[1], width)))
        for top in range(0, height, size[0])
        for left in range(0, width, size[1])
    ]


# ------------------------------------------------------------------------------- synthetic masks
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_lesion_mask_tiles_mark_exactly_the_pixels_inside_the_lesions_at_every_level(
    masked_slide: SyntheticSlide, level: int
) -> None:
    with open_slide(masked_slide.path, level=level) as slide, open_label_mask(masked_slide.mask_path, slide) as mask:
        height, width = slide.shape[2:]
        assert isinstance(mask, ImageSource) and mask.shape == (1, 1, height, width)
        expected = _inside_lesions(masked_slide, (height, width), 2**level)
        assert expected.sum() > 100
        for rows, cols in _tiles(height, width, (200, 300)):  # tiles that straddle the TIFF's 256-px tiles
            tile = mask.read(rows, cols)
            assert tile.shape == (1, 1, rows.stop - rows.start, cols.stop - cols.start)
            assert tile.dtype == torch.uint8
            np.testing.assert_array_equal(tile[0, 0].numpy(), expected[rows, cols])


@pytest.mark.parametrize("level", [0, 1])
def test_mask_tiles_cover_the_dark_nuclei_of_the_image_tiles_they_align_with(
    masked_slide: SyntheticSlide, level: int
) -> None:
    reach = int(np.ceil(4 / 2**level))  # a nucleus core lies within ~3.5 level-0 px of its centre, inside a lesion
    dark_total = 0
    with open_slide(masked_slide.path, level=level) as slide, open_label_mask(masked_slide.mask_path, slide) as mask:
        grown = F.max_pool2d(_whole(mask).float(), 2 * reach + 1, stride=1, padding=reach)[0, 0].bool()
        for rows, cols in _tiles(*slide.shape[2:], (400, 600)):
            dark = slide.read(rows, cols)[0, 0] < DARK_RED
            lesion = mask.read(rows, cols)[0, 0].bool()
            dark_total += int(dark.sum())
            assert not (dark & ~grown[rows, cols]).any(), "a nucleus core lies outside every lesion"
            assert int((dark & lesion).sum()) >= 0.8 * int(dark.sum())
    assert dark_total > 50


def test_synthetic_mask_has_the_slides_pyramid_and_mpp(masked_slide: SyntheticSlide) -> None:
    with open_slide(masked_slide.mask_path) as as_slide:  # OpenSlide reads the mask like a slide
        assert as_slide.level_shapes == masked_slide.level_shapes
        assert as_slide.mpp == pytest.approx(masked_slide.mpp)
    with tifffile.TiffFile(masked_slide.mask_path) as tif:
        assert tif.pages[0].dtype == np.uint8 and tif.pages[0].samplesperpixel == 1


# --------------------------------------------------------------------------- level matching
def _random_labels(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8)


@pytest.mark.parametrize(
    ("scale", "tile", "mask_levels"),
    [
        (1, 128, 5),  # full resolution, a pyramid deeper than the slide's
        (1, 512, 3),  # full resolution, one level fewer than the slide
        (1, 2048, 1),  # full resolution, no pyramid
        (4, 128, 3),  # a quarter of the resolution: the slide's levels 0 and 1 upsample it
    ],
)
def test_mask_read_at_each_slide_level_equals_nearest_neighbour_resampling_of_the_full_mask(
    masked_slide: SyntheticSlide, tmp_path: Path, scale: int, tile: int, mask_levels: int
) -> None:
    full = _random_labels((1024 // scale, 1536 // scale))  # random labels: any index off by one shows
    path = write_segmentation(tmp_path / "mask.tif", [(slice(None), slice(None), full)], full.shape, tile=tile)
    for level in range(4):
        with open_slide(masked_slide.path, level=level) as slide, open_label_mask(path, slide) as mask:
            assert len(mask.level_shapes) == mask_levels
            nearest = F.interpolate(torch.from_numpy(full)[None, None].float(), size=slide.shape[2:], mode="nearest")
            expected = nearest[0, 0].to(torch.uint8).numpy()
            np.testing.assert_array_equal(_whole(mask)[0, 0].numpy(), expected)
            for rows, cols in _tiles(*slide.shape[2:], (200, 300)):
                np.testing.assert_array_equal(mask.read(rows, cols)[0, 0].numpy(), expected[rows, cols])
            # the coarsest mask level at least as fine as the slide level (else the finest)
            assert mask.level == (min(level, mask_levels - 1) if scale == 1 else max(0, level - 2))


def test_wider_integer_masks_keep_their_values(masked_slide: SyntheticSlide, tmp_path: Path) -> None:
    labels = np.arange(256 * 384, dtype=np.int32).reshape(256, 384) - 5  # negative (ignore) and > 255
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, labels, tile=(64, 64), compression="zlib")
    with open_slide(masked_slide.path, level=2) as slide, open_label_mask(path, slide) as mask:
        assert mask.dtype == torch.int64
        np.testing.assert_array_equal(_whole(mask)[0, 0].numpy(), labels)


def test_one_bit_masks_read_as_0_and_1(masked_slide: SyntheticSlide, tmp_path: Path) -> None:
    labels = _random_labels((256, 384), seed=2) > 1
    tifffile.imwrite(tmp_path / "bits.tif", labels, tile=(64, 64))  # a bilevel TIFF
    with open_slide(masked_slide.path, level=2) as slide, open_label_mask(tmp_path / "bits.tif", slide) as mask:
        assert mask.dtype == torch.uint8
        np.testing.assert_array_equal(_whole(mask)[0, 0].numpy(), labels.astype(np.uint8))


def test_a_striped_tiff_reads_like_a_tiled_one(masked_slide: SyntheticSlide, tmp_path: Path) -> None:
    labels = _random_labels((256, 384), seed=1)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, labels, rowsperstrip=10, compression="zlib")
    with open_slide(masked_slide.path, level=1) as slide, open_label_mask(path, slide) as mask:
        nearest = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=slide.shape[2:], mode="nearest")
        tile = mask.read(slice(30, 333), slice(7, 500))[0, 0].numpy()
        np.testing.assert_array_equal(tile, nearest[0, 0, 30:333, 7:500].to(torch.uint8).numpy())


def test_a_label_mask_pickles_by_path_and_reads_the_same(masked_slide: SyntheticSlide) -> None:
    with open_slide(masked_slide.path, level=1) as slide, open_label_mask(masked_slide.mask_path, slide) as mask:
        again = pickle.loads(pickle.dumps(mask))
        torch.testing.assert_close(_whole(again), _whole(mask), rtol=0, atol=0)
        again.close()
        with pytest.raises(ValueError, match="closed"):
            again.read(slice(0, 8), slice(0, 8))


# -------------------------------------------------------------------------------------- errors
def test_mask_of_another_aspect_ratio_is_refused_naming_both_files_and_sizes(
    masked_slide: SyntheticSlide, tmp_path: Path
) -> None:
    path = tmp_path / "square.tif"
    tifffile.imwrite(path, np.zeros((256, 256), np.uint8), tile=(64, 64))
    with open_slide(masked_slide.path) as slide, pytest.raises(MaskMismatchError) as caught:
        open_label_mask(path, slide)
    message = str(caught.value)
    assert str(path) in message and str(masked_slide.path) in message
    assert "256x256" in message and "1536x1024" in message
    assert caught.value.slide_path == masked_slide.path


@pytest.mark.parametrize(
    ("pixels", "words"),
    [
        (np.zeros((64, 96), np.float32), "float32"),
        (np.zeros((64, 96, 3), np.uint8), "one channel"),
        (np.zeros((2, 64, 96), np.uint8), "one channel"),
    ],
)
def test_masks_that_hold_no_single_channel_of_integer_labels_are_refused(
    masked_slide: SyntheticSlide, tmp_path: Path, pixels: np.ndarray, words: str
) -> None:
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, pixels, tile=(32, 32), photometric="rgb" if pixels.shape[-1] == 3 else "minisblack")
    with open_slide(masked_slide.path) as slide, pytest.raises(UnsupportedSlideError, match=words) as caught:
        open_label_mask(path, slide)
    assert str(path) in str(caught.value)


def test_missing_or_non_tiff_masks_are_refused_naming_the_file(masked_slide: SyntheticSlide, tmp_path: Path) -> None:
    with open_slide(masked_slide.path) as slide:
        with pytest.raises(SlideNotFoundError, match="missing.tif"):
            open_label_mask(tmp_path / "missing.tif", slide)
        png = tmp_path / "mask.png"
        Image.fromarray(np.zeros((64, 96), np.uint8)).save(png)
        with pytest.raises(UnsupportedSlideError, match="read lazily from TIFF"):
            open_label_mask(png, slide)


# ------------------------------------------------------------------------------------ datasets
def _oriented(pixels: torch.Tensor, sample: SegmentationSample) -> torch.Tensor:
    """``pixels`` of the sample's box turned like the sample (mirror, then quarter turns), in memory."""
    if sample.flipped:
        pixels = torch.flip(pixels, dims=(3,))
    return torch.rot90(pixels, sample.quarter_turns, dims=(2, 3))


def test_views_turn_image_and_target_alike_so_lesion_pixels_stay_lesion_pixels(
    masked_slide: SyntheticSlide, tmp_path: Path
) -> None:
    lesion = masked_slide.lesions[0]
    roi = np.zeros((128, 192), np.uint8)  # a region-of-interest mask (1/8 of level 0) around the first lesion
    top, left = round(lesion.center_y / 8), round(lesion.center_x / 8)
    roi[max(0, top - 12) : top + 12, max(0, left - 16) : left + 16] = 255
    Image.fromarray(roi).save(tmp_path / "roi.png")
    record = SlideRecord(masked_slide.path, 1, tmp_path / "roi.png", masked_slide.mask_path)
    dataset = SegmentationSlideDataset([record], level=1, stride=32, augmentation=Augmentation(hue=0.05))
    orientations = set()
    for epoch in range(64):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        if (sample.flipped, sample.quarter_turns) in orientations:
            sample.close()
            continue
        orientations.add((sample.flipped, sample.quarter_turns))
        box = sample.box
        assert box.height != box.width  # so a quarter turn shows in the shape
        plain_image = sample.slide.read(slice(box.top, box.bottom), slice(box.left, box.right))
        plain_mask = sample.label_mask.read(slice(box.top, box.bottom), slice(box.left, box.right))
        target = _whole(sample.target)
        assert sample.target.shape[2:] == sample.image.shape[2:] == target.shape[2:]
        torch.testing.assert_close(target, _oriented(plain_mask, sample), rtol=0, atol=0)
        jittered = ColorJitterView(TensorSource(_oriented(plain_image, sample)), sample.jitter)
        torch.testing.assert_close(_whole(sample.image), _whole(jittered), rtol=0, atol=0)  # jitter on the image only
        assert set(target.unique().tolist()) == {0, 1}
        dark_in_lesion = ((plain_image[0, 0] < DARK_RED) & plain_mask[0, 0].bool()).sum()
        assert dark_in_lesion > 10
        turned = _oriented(plain_image, sample)[0, 0] < DARK_RED
        assert (turned & target[0, 0].bool()).sum() == dark_in_lesion
        for rows, cols in _tiles(*sample.target.shape[2:], (40, 56)):  # tiles of the views agree with the whole
            torch.testing.assert_close(sample.target.read(rows, cols), target[:, :, rows, cols], rtol=0, atol=0)
        sample.close()
    assert len(orientations) == 8


def test_target_beyond_the_slide_reads_the_mask_fill(masked_slide: SyntheticSlide) -> None:
    record = SlideRecord(masked_slide.path, 1, label_mask_path=masked_slide.mask_path)
    dataset = SegmentationSlideDataset([record], mask_fill=255, crop_to_tissue=False, stride=1000)
    sample = dataset[0]
    assert sample.target.shape == (1, 1, 2000, 2000)
    target = _whole(sample.target)[0, 0]
    assert (target[1024:] == 255).all() and (target[:, 1536:] == 255).all()
    np.testing.assert_array_equal(target[:1024, :1536].numpy(), _inside_lesions(masked_slide, (1024, 1536), 1))
    sample.close()


def test_synthetic_dataset_records_label_masks_that_a_segmentation_dataset_loads(tmp_path: Path) -> None:
    records = write_synthetic_dataset(tmp_path, n=2, size=(512, 512), positive_fraction=0.5, label_masks=True)
    with (tmp_path / "labels.csv").open() as file:
        assert next(csv.reader(file)) == ["path", "label", "label_mask"]
    assert read_slide_table(tmp_path / "labels.csv") == records
    dataset = SegmentationSlideDataset(tmp_path / "labels.csv", level=1)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_single)
    for record, batch in zip(records, loader):
        assert isinstance(batch, SegmentationSample)
        lesion_pixels = int(_whole(batch.target).sum())
        assert (lesion_pixels > 0) == bool(record.label)
        moved = replace(batch, label=batch.label.to("cpu"))  # what ImageClassifier.transfer_batch_to_device does
        assert int(_whole(moved.target).sum()) == lesion_pixels
        travelled = pickle.loads(pickle.dumps(batch))  # as from a DataLoader worker
        torch.testing.assert_close(_whole(travelled.target), _whole(batch.target), rtol=0, atol=0)
        travelled.close()
        batch.close()


def test_slide_tables_without_label_masks_still_read(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("path,label\nslide.tif,1\n")
    assert read_slide_table(table) == [SlideRecord(tmp_path / "slide.tif", 1)]


def test_a_segmentation_dataset_needs_a_label_mask_for_every_slide(masked_slide: SyntheticSlide) -> None:
    with pytest.raises(ValueError, match="no label mask.*slide.tif"):
        SegmentationSlideDataset([SlideRecord(masked_slide.path, 1)])


def test_segmentation_written_for_a_slide_reopens_as_its_label_mask(
    masked_slide: SyntheticSlide, tmp_path: Path
) -> None:
    with open_slide(masked_slide.path, level=1) as slide:
        expected = _inside_lesions(masked_slide, slide.shape[2:], 2)
        with SegmentationWriter(tmp_path / "prediction.tif", slide.shape[2:], mpp=slide.mpp) as writer:
            for rows, cols in _tiles(*slide.shape[2:], (96, 160)):
                writer.write(rows, cols, torch.from_numpy(expected[rows, cols])[None, None])
        assert isinstance(open_label_mask(writer.path, slide), LabelMask)
        with open_label_mask(writer.path, slide) as mask:
            np.testing.assert_array_equal(_whole(mask)[0, 0].numpy(), expected)
