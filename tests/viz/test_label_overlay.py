"""plot_label_overlay: a label map tinted over a thumbnail, with a legend of the classes present."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure

from lightstream.data import blend_labels
from lightstream.viz import plot_label_overlay


def test_overlay_draws_the_blend_and_names_the_classes_present(artist: Callable) -> None:
    thumbnail = np.full((40, 60, 3), 230, np.uint8)
    labels = np.zeros((40, 60), np.uint8)
    labels[5:15, 10:30] = 2
    figure = plot_label_overlay(thumbnail, labels, alpha=0.4, class_names=["background", "stroma", "tumour"],
                                title="prediction")
    assert isinstance(figure, Figure)
    np.testing.assert_array_equal(artist(figure, "label-overlay").get_array(), blend_labels(thumbnail, labels, 0.4))
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["tumour"]
    assert figure.axes[0].get_title() == "prediction"
