"""Small synthetic slides shared by the data-layer tests (written once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lightstream.data import SyntheticSlide, write_synthetic_slide


@pytest.fixture(scope="session")
def lesion_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 1024 x 1536 lossless slide with 2 lesions; levels 1024, 512, 256, 128 px tall."""
    path = tmp_path_factory.mktemp("slides") / "lesion.tif"
    return write_synthetic_slide(path, size=(1024, 1536), lesions=2, seed=3, compression="zlib")


@pytest.fixture(scope="session")
def plain_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 768 x 640 JPEG slide without lesions."""
    path = tmp_path_factory.mktemp("slides") / "plain.tif"
    return write_synthetic_slide(path, size=(768, 640), lesions=0, seed=5)


def _write_tiled_tiff(path: Path, levels: list[np.ndarray], mpp: float | None = 0.25, tile: int = 64) -> Path:
    """A lossless tiled TIFF with the given RGB levels (no synthetic content, exact pixels known)."""
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            resolution = {}
            if mpp is not None:
                pixels_per_cm = 1e4 / mpp * level.shape[0] / levels[0].shape[0]
                resolution = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if index else 0,
                metadata=None,
                **resolution,
            )
    return path


@pytest.fixture(scope="session")
def write_tiled_tiff() -> Callable[..., Path]:
    """``write_tiled_tiff(path, levels, mpp=0.25, tile=64)``: a lossless tiled TIFF of exactly these pixels."""
    return _write_tiled_tiff
