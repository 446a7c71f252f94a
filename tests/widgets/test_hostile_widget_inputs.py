"""Hostile inputs to the widgets: the tuner and the memory monitor refuse nonsense by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightstream.widgets import MemoryMonitor, TileTunerModel

IMAGE = (96, 96)


@pytest.mark.parametrize(("tile_sizes", "error", "message"), [
    ([], ValueError, "tile_sizes is empty: give at least one tile side"),
    ([-16, 0, 32], ValueError, r"tile_sizes must hold positive integers \(pixels\); these are not: \[-16, 0\]"),
    ([16.7, 32], ValueError, r"these are not: \[16.7\]"),
    ([True, 32], ValueError, r"these are not: \[True\]"),
    ("32", TypeError, "tile_sizes must be a list of tile sides in pixels, got '32'"),
    (32, TypeError, "tile_sizes must be a list of tile sides in pixels, got 32"),
])
def test_tile_size_options_that_are_not_positive_integers_are_refused(trunk: nn.Module, tile_sizes, error,
                                                                      message) -> None:
    with pytest.raises(error, match=message):
        TileTunerModel(trunk, IMAGE, tile_sizes)


@pytest.mark.parametrize("tile_size", [-3, 0, 24.5, "32"])
def test_an_initial_tile_size_that_is_not_a_positive_integer_is_refused(trunk: nn.Module, tile_size) -> None:
    with pytest.raises(ValueError, match=rf"tile_size must be a positive integer \(pixels\), got {tile_size!r}"):
        TileTunerModel(trunk, IMAGE, [16, 32], tile_size=tile_size)


def test_a_thumbnail_size_of_zero_is_refused(trunk: nn.Module) -> None:
    with pytest.raises(ValueError, match="thumbnail_size must be a positive integer"):
        TileTunerModel(trunk, torch.rand(1, 3, *IMAGE), thumbnail_size=0)


@pytest.mark.parametrize("image", [(0, 0), (-5, 64), (1, 3, 64, 0)])
def test_an_image_of_no_pixels_is_refused_naming_its_shape(trunk: nn.Module, image) -> None:
    with pytest.raises(ValueError, match=r"the image's shape \(B, C, H, W\) must be positive, got \("):
        TileTunerModel(trunk, image)


def test_a_file_name_instead_of_an_image_says_to_open_the_slide(trunk: nn.Module) -> None:
    with pytest.raises(TypeError, match="cannot tune for a str: .*open_slide"):
        TileTunerModel(trunk, "slide.tif")


def test_an_image_smaller_than_the_receptive_field_shows_a_warning_naming_its_size() -> None:
    unpadded = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5))  # receptive field 9 px
    model = TileTunerModel(unpadded, torch.rand(1, 3, 4, 4))
    assert model.plan is None and model.estimate is None
    assert "image of 4x4 px is too small for this trunk" in model.warning


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"refresh_s": -1}, ValueError, "refresh_s must be a non-negative number of seconds, got -1"),
    ({"refresh_s": float("nan")}, ValueError, "refresh_s must be a non-negative number of seconds, got nan"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be a positive integer or None, got 0"),
    ({"log_every_n_steps": 2.5}, ValueError, "log_every_n_steps must be a positive integer or None, got 2.5"),
    ({"dpi": 0}, ValueError, "dpi must be a positive integer, got 0"),
    ({"live": "yes"}, TypeError, "live must be True, False or None .* got 'yes'"),
])
def test_memory_monitor_refuses_arguments_that_would_never_log_or_plot(options, error, message) -> None:
    with pytest.raises(error, match=message):
        MemoryMonitor(**options)


def test_memory_monitor_accepts_its_defaults_and_a_zero_refresh() -> None:
    monitor = MemoryMonitor(live=False, refresh_s=0, log_every_n_steps=1, dpi=50)
    assert (monitor.refresh_s, monitor.log_every_n_steps, monitor.dpi) == (0, 1, 50)
