"""plot_memory and plot_memory_by_image_size."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torchvision
from matplotlib.figure import Figure
from torch import nn

from lightstream import StreamingCNN
from lightstream.viz import MemorySample, plot_memory, plot_memory_by_image_size

GIB = 1 << 30


def test_cpu_history_plots_rss_and_step_time() -> None:
    history = [MemorySample(i, 0.5 * (i + 1), 0.5, GIB + i) for i in range(4)]
    figure = plot_memory(history)
    memory_ax, time_ax = figure.axes
    assert [line.get_label() for line in memory_ax.get_lines()] == ["process RSS (host)"]
    assert list(time_ax.get_lines()[0].get_ydata()) == [0.5] * 4
    assert "step 3" in memory_ax.get_title()


def test_gpu_history_plots_every_series_on_given_axes() -> None:
    figure = Figure()
    axes = tuple(figure.subplots(2, 1))
    history = [MemorySample(i, float(i), 1.0, GIB, GIB, 3 * GIB, 4 * GIB) for i in range(3)]
    assert plot_memory(history, axes=axes) is figure
    labels = {line.get_label() for line in axes[0].get_lines()}
    assert {"GPU peak allocated", "GPU allocated (step end)", "GPU reserved", "process RSS (host)"} == labels


def test_empty_history_says_so() -> None:
    figure = plot_memory([])
    assert figure.axes[0].texts[0].get_text() == "no steps recorded yet"


def test_viz_does_not_import_widgets() -> None:
    code = "import sys, lightstream.viz; assert 'ipywidgets' not in sys.modules, 'viz imported ipywidgets'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_by_image_size_marks_every_stage_plan_change() -> None:
    """ResNet-18 at 512-px tiles keeps 3 stage maps up to 4096², 1 at 8192², none at 16384²."""
    trunk = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2]).eval()
    engine = StreamingCNN(trunk, tile_size=512)
    sides = [1024, 2048, 4096, 8192, 16384]
    figure = plot_memory_by_image_size(engine, sides)
    ax = figure.axes[0]
    (curve,) = [line for line in ax.get_lines() if len(line.get_xdata()) == len(sides)]
    expected = [engine.estimate((1, 3, s, s)).peak_bytes / GIB for s in sides]
    assert list(curve.get_ydata()) == pytest.approx(expected)
    marks = [line for line in ax.get_lines() if line.get_gid() == "stage-plan-change"]
    assert [line.get_xdata()[0] for line in marks] == [8192, 16384]
    notes = [text.get_text() for text in ax.texts]
    assert notes == ["stage plan changes:\nkeeps 1 map", "stage plan changes:\nkeeps 0 maps"]
    assert "Not monotonic" in ax.get_title()
    assert "stage plan changes (dashed)" in [t.get_text() for t in ax.get_legend().get_texts()]
