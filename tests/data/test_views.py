"""Lazy views (crop/pad, flips, rotations, colour jitter) equal the same operation on the in-memory image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightstream.core.source import ImageSource, TensorSource
from lightstream.data import (
    Box,
    ColorJitter,
    ColorJitterView,
    CropView,
    FlipView,
    Rot90View,
    SyntheticSlide,
    crop_to_multiple,
    fit_box_to_multiple,
    open_slide,
    pad_to_multiple,
)
from lightstream.viz import thumbnail
from lightstream.widgets import TileTunerModel


def _image(height: int = 37, width: int = 53, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=generator)


def _read_all(source: ImageSource) -> torch.Tensor:
    return source.read(slice(None), slice(None))


def _read_in_tiles(source: ImageSource, tile: int) -> torch.Tensor:
    """Stitch the whole image from ``tile x tile`` reads (what the engine does)."""
    _, _, height, width = source.shape
    rows = [
        torch.cat([source.read(slice(r, r + tile), slice(c, c + tile)) for c in range(0, width, tile)], dim=3)
        for r in range(0, height, tile)
    ]
    return torch.cat(rows, dim=2)


ORIENTATIONS = [(k, flip) for k in range(4) for flip in (False, True)]


@pytest.mark.parametrize(("quarter_turns", "flipped"), ORIENTATIONS)
def test_flip_and_rot90_views_equal_flipping_and_rotating_the_array(quarter_turns: int, flipped: bool) -> None:
    image = _image()
    view: ImageSource = TensorSource(image)
    expected = image
    if flipped:
        view, expected = FlipView(view, horizontal=True), torch.flip(expected, [3])
    view, expected = Rot90View(view, quarter_turns), torch.rot90(expected, quarter_turns, dims=(2, 3))
    assert view.shape == tuple(expected.shape)
    assert torch.equal(_read_all(view), expected)
    assert torch.equal(_read_in_tiles(view, 8), expected)


@settings(max_examples=60, deadline=None)
@given(
    quarter_turns=st.integers(0, 3),
    horizontal=st.booleans(),
    vertical=st.booleans(),
    r0=st.integers(0, 60),
    c0=st.integers(0, 60),
    height=st.integers(0, 40),
    width=st.integers(0, 40),
)
def test_any_rectangle_of_an_oriented_view_equals_that_rectangle_of_the_oriented_array(
    quarter_turns: int, horizontal: bool, vertical: bool, r0: int, c0: int, height: int, width: int
) -> None:
    image = _image()
    view = Rot90View(FlipView(TensorSource(image), horizontal, vertical), quarter_turns)
    flips = [d for d, on in ((2, vertical), (3, horizontal)) if on]
    expected = torch.rot90(torch.flip(image, flips) if flips else image, quarter_turns, dims=(2, 3))
    rows, cols = slice(r0, r0 + height), slice(c0, c0 + width)
    assert torch.equal(view.read(rows, cols), expected[:, :, rows, cols])


def test_oriented_views_over_a_slide_equal_orienting_the_loaded_level(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=2) as slide:
        loaded = _read_all(slide)
        view = Rot90View(FlipView(slide, horizontal=True, vertical=True), 3)
        expected = torch.rot90(torch.flip(loaded, [2, 3]), 3, dims=(2, 3))
        assert torch.equal(_read_in_tiles(view, 100), expected)


def test_crop_view_inside_the_image_equals_slicing() -> None:
    image = _image()
    view = CropView(TensorSource(image), Box(5, 7, 25, 37))
    assert view.shape == (1, 3, 20, 30)
    assert torch.equal(_read_in_tiles(view, 6), image[:, :, 5:25, 7:37])


def test_crop_view_reaching_outside_the_image_pads_with_fill() -> None:
    image = _image(10, 12)
    view = CropView(TensorSource(image), Box(-3, -2, 13, 18), fill=255)
    expected = torch.full((1, 3, 16, 20), 255, dtype=torch.uint8)
    expected[:, :, 3:13, 2:14] = image
    assert torch.equal(_read_all(view), expected)
    assert torch.equal(_read_in_tiles(view, 5), expected)
    assert torch.equal(view.read(slice(0, 2), slice(0, 20)), expected[:, :, :2])  # entirely outside


def test_slide_crop_is_lazy_view_of_the_box(lesion_slide: SyntheticSlide) -> None:
    with open_slide(lesion_slide.path, level=1) as slide:
        crop = slide.crop(Box(100, 200, 164, 296))
        assert crop.shape == (1, 3, 64, 96)
        assert torch.equal(_read_all(crop), slide.read(slice(100, 164), slice(200, 296)))


@pytest.mark.parametrize(("stride", "padded", "cropped"), [(1, (37, 53), (37, 53)), (8, (40, 56), (32, 48)), (32, (64, 64), (32, 32)), (64, (64, 64), (0, 0))])
def test_padding_and_cropping_reach_the_expected_multiple_of_the_stride(
    stride: int, padded: tuple[int, int], cropped: tuple[int, int]
) -> None:
    source = TensorSource(_image(37, 53))
    pad = pad_to_multiple(source, stride)
    crop = crop_to_multiple(source, stride)
    assert pad.shape[2:] == padded
    assert crop.shape[2:] == cropped
    assert torch.equal(_read_all(pad)[:, :, :37, :53], _image(37, 53))
    assert bool((_read_all(pad)[:, :, 37:] == 255).all())


@settings(max_examples=200, deadline=None)
@given(
    top=st.integers(0, 500),
    left=st.integers(0, 500),
    height=st.integers(1, 500),
    width=st.integers(1, 500),
    stride=st.integers(1, 64),
    extra=st.integers(0, 300),
)
def test_fitted_box_is_a_multiple_of_the_stride_containing_the_box_and_inside_the_image_if_it_fits(
    top: int, left: int, height: int, width: int, stride: int, extra: int
) -> None:
    bounds = (top + height + extra, left + width + extra)
    fitted = fit_box_to_multiple(Box(top, left, top + height, left + width), stride, bounds)
    assert fitted.height % stride == 0 and fitted.width % stride == 0
    assert fitted.height - height < stride and fitted.width - width < stride
    assert fitted.top >= 0 and fitted.left >= 0
    if fitted.height <= bounds[0]:
        assert fitted.top <= top and fitted.bottom >= top + height and fitted.bottom <= bounds[0]
    if fitted.width <= bounds[1]:
        assert fitted.left <= left and fitted.right >= left + width and fitted.right <= bounds[1]


def test_stride_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        pad_to_multiple(TensorSource(_image()), 0)


def test_identity_colour_jitter_leaves_pixels_unchanged() -> None:
    image = _image()
    assert torch.equal(_read_all(ColorJitterView(TensorSource(image), ColorJitter())), image)


def test_colour_jitter_is_per_pixel_so_tiles_stitch_to_the_whole_image_and_reads_repeat() -> None:
    image = _image(64, 80)
    jitter = ColorJitter.sample(np.random.default_rng(1), brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    view = ColorJitterView(TensorSource(image), jitter)
    whole = _read_all(view)
    assert whole.dtype == torch.uint8
    assert not torch.equal(whole, image)
    assert torch.equal(_read_in_tiles(view, 7), whole)
    assert torch.equal(_read_all(view), whole)


def test_colour_jitter_equals_its_affine_map_on_the_array() -> None:
    image = _image()
    jitter = ColorJitter(brightness=1.1, contrast=0.9, saturation=1.2, hue=0.05)
    matrix, offset = jitter.affine()
    pixels = image[0].double().reshape(3, -1)
    expected = (torch.from_numpy(matrix) @ pixels + torch.from_numpy(offset)[:, None]).round().clamp(0, 255)
    got = _read_all(ColorJitterView(TensorSource(image), jitter))[0].double().reshape(3, -1)
    assert (got - expected).abs().max() <= 1  # float32 vs float64 rounding at .5 boundaries


def test_colour_jitter_saturation_zero_makes_grey_and_brightness_scales() -> None:
    image = _image().float()
    grey = _read_all(ColorJitterView(TensorSource(image), ColorJitter(saturation=0.0)))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-3) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-3)
    darker = _read_all(ColorJitterView(TensorSource(image), ColorJitter(brightness=0.5)))
    assert torch.allclose(darker, image * 0.5, atol=1e-3)


def _as_array(tile: torch.Tensor) -> np.ndarray:
    return tile[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("make_view", [
    lambda s: CropView(s, Box(5, 7, 25, 37)),
    lambda s: CropView(s, Box(-3, -2, 40, 58), fill=255),
    lambda s: FlipView(s, horizontal=True),
    lambda s: FlipView(s, vertical=True, horizontal=True),
    lambda s: Rot90View(s, 1),
    lambda s: Rot90View(CropView(s, Box(2, 3, 30, 50)), 3),
    lambda s: ColorJitterView(FlipView(s, vertical=True), ColorJitter(1.1, 0.9, 0.8, 0.05)),
], ids=["crop", "pad", "flip", "flip-both", "rot90", "rot270-of-crop", "jitter-of-flip"])
def test_a_views_thumbnail_at_full_size_equals_its_pixels(make_view) -> None:
    view = make_view(TensorSource(_image()))
    assert np.array_equal(view.thumbnail(1000), _as_array(_read_all(view)))


def test_a_crop_of_a_slide_has_a_thumbnail_like_its_pixels_and_the_tile_tuner_draws_it(
    lesion_slide: SyntheticSlide,
) -> None:
    with open_slide(lesion_slide.path, level=1) as slide:  # 512 x 768
        view = Rot90View(pad_to_multiple(slide.crop(Box(100, 200, 356, 584)), 32), 1)
        assert view.shape == (1, 3, 384, 256)
        for size in (128, 300):
            small = view.thumbnail(size)
            assert size // 2 <= small.shape[0] <= size and small.dtype == np.uint8  # as a slide's thumbnail
            assert abs(small.shape[0] / small.shape[1] - 1.5) < 0.05
        small = view.thumbnail(128)
        step = 384 // small.shape[0]
        expected = _as_array(_read_all(view))[step // 2 :: step, step // 2 :: step].astype(float)
        assert expected.shape == small.shape
        error = np.abs(small - expected).mean()  # box-averaged vs strided pixels: close...
        shifted = [np.abs(small - np.roll(expected, 2, axis=axis)).mean() for axis in (0, 1)]
        assert error < 3.5 and error < 0.6 * min(shifted)  # ...and aligned (2 px off is twice as far)
        trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2)).eval()
        tuner = TileTunerModel(trunk, view, thumbnail_size=128)
        assert tuner.thumbnail is not None and tuner.thumbnail.shape == small.shape
        assert thumbnail(view, 64).shape[0] <= 64
