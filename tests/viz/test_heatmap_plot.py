"""plot_heatmap_overlay: a heatmap over a thumbnail, with a labelled and optionally clipped colour scale."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from lightstream.viz import plot_heatmap_overlay


def test_percentile_clips_the_colour_scale_so_small_values_show(artist: Callable) -> None:
    heatmap = np.full((50, 50), np.nan)
    heatmap[:10, :10] = np.linspace(0.0, 1.0, 100).reshape(10, 10)
    heatmap[0, 0] = 1000.0   # one extreme value
    figure = plot_heatmap_overlay(np.zeros((50, 50, 3)), heatmap, label="saliency", percentile=90)
    layer = artist(figure, "heatmap")
    finite = heatmap[np.isfinite(heatmap)]
    assert layer.norm.vmax == pytest.approx(np.percentile(finite, 90))
    assert layer.norm.vmax < 1.0   # the one extreme value does not set the scale
    colorbar_ax = figure.axes[1]
    assert colorbar_ax.get_ylabel() == "saliency"


def test_without_percentile_the_scale_spans_every_value(artist: Callable) -> None:
    heatmap = np.arange(16.0).reshape(4, 4)
    layer = artist(plot_heatmap_overlay(np.zeros((4, 4)), heatmap), "heatmap")
    assert (layer.norm.vmin, layer.norm.vmax) == (0.0, 15.0)


def test_percentile_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="percentile must be in"):
        plot_heatmap_overlay(np.zeros((4, 4)), np.zeros((4, 4)), percentile=0)
