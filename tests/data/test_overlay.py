"""A label mask over a slide thumbnail: the blended array and the PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightstream.data import (
    LABEL_COLORS,
    SyntheticSlide,
    blend_labels,
    label_colors,
    labels_on_thumbnail,
    open_slide,
    write_overlay_png,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def masked_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    folder = tmp_path_factory.mktemp("overlay")
    return write_synthetic_slide(
        folder / "slide.tif", size=(1024, 1536), lesions=2, seed=3, compression="zlib", mask_path=folder / "labels.tif"
    )


def test_blend_tints_labelled_pixels_by_alpha_and_leaves_background_alone() -> None:
    thumbnail = np.full((2, 3, 3), 200, np.uint8)
    labels = np.array([[0, 1, 2], [11, 0, 1]])
    blended = blend_labels(thumbnail, labels, alpha=0.25)
    assert (blended[labels == 0] == 200).all()
    np.testing.assert_array_equal(blended[0, 1], np.rint(0.75 * 200 + 0.25 * LABEL_COLORS[1].astype(float)))
    np.testing.assert_array_equal(label_colors(11), LABEL_COLORS[2])  # labels past 9 cycle through 1..9
    np.testing.assert_array_equal(blended[1, 0], blended[0, 2])
    with pytest.raises(ValueError, match="differ in size"):
        blend_labels(thumbnail, labels[:, :2])
    with pytest.raises(ValueError, match="only 2 colours"):
        blend_labels(thumbnail, labels, colors=[[0, 0, 0], [255, 0, 0]])


def test_png_shows_the_lesions_on_the_thumbnail_where_the_mask_has_them(
    masked_slide: SyntheticSlide, tmp_path: Path
) -> None:
    png = write_overlay_png(tmp_path / "overlay.png", masked_slide.path, masked_slide.mask_path, max_size=384)
    with open_slide(masked_slide.path) as slide:
        thumbnail = slide.thumbnail(384)
    labels = labels_on_thumbnail(masked_slide.mask_path, thumbnail.shape[:2])
    overlay = np.asarray(Image.open(png))
    assert overlay.shape == thumbnail.shape == (256, 384, 3)
    assert 100 < labels.sum() < labels.size / 4
    np.testing.assert_array_equal(overlay[labels == 0], thumbnail[labels == 0])
    np.testing.assert_array_equal(overlay, blend_labels(thumbnail, labels))
    assert not np.array_equal(overlay[labels == 1], thumbnail[labels == 1])
