"""plot_memory."""

from __future__ import annotations

import subprocess
import sys

from matplotlib.figure import Figure

from lightstream.viz import MemorySample, plot_memory

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
