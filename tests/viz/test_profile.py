"""plot_receptive_profile and the choice of the layer that limits the tile stride."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from matplotlib.figure import Figure
from torch import nn

from lightstream import LayerProfile, StreamingCNN
from lightstream.viz import border_increase, limiting_layer, plot_receptive_profile


def layer(path: str, lost: tuple[int, int, int, int], stride: int = 1) -> LayerProfile:
    return LayerProfile(path, (stride, stride), (1, 1), lost)


def test_limiting_layer_is_the_largest_growth_deepest_on_ties() -> None:
    profile = [layer("a", (1, 1, 1, 1)), layer("b", (5, 5, 5, 5)), layer("c", (6, 6, 6, 6)),
               layer("d", (10, 10, 10, 10))]
    assert border_increase(profile) == [2, 8, 2, 8]
    assert limiting_layer(profile) == 3


def test_a_parallel_branch_does_not_credit_the_next_layer() -> None:
    # "down" is a shortcut branch losing less than the main path; "next" continues the main path.
    profile = [layer("main", (8, 8, 8, 8)), layer("down", (2, 2, 2, 2)), layer("next", (9, 9, 9, 9))]
    assert border_increase(profile) == [16, 0, 2]
    assert limiting_layer(profile) == 0


def test_limiting_layer_needs_layers() -> None:
    with pytest.raises(ValueError, match="empty profile"):
        limiting_layer([])


def _legend_texts(figure: Figure) -> list[str]:
    legend = figure.legends[0] if figure.legends else figure.axes[0].get_legend()
    return [t.get_text() for t in legend.get_texts()]


def test_profile_plot_gives_each_quantity_a_panel_and_keys_every_mark(
    engine: StreamingCNN, artist: Callable
) -> None:
    profile = engine.geometry.profile(64)
    figure = plot_receptive_profile(profile, tile_size=64)
    lost_ax, field_ax = figure.axes
    title = figure.get_suptitle()
    top, left, bottom, right = profile[-1].lost
    assert "forward = backward" in title
    assert f"{64 - top - bottom}×{64 - left - right} px" in title
    assert lost_ax.get_ylabel().startswith("lost border") and field_ax.get_ylabel().startswith("receptive field")
    assert list(lost_ax.get_lines()[0].get_ydata()) == [layer.lost[0] for layer in profile]
    assert list(field_ax.get_lines()[0].get_ydata()) == [layer.receptive_field[0] for layer in profile]
    texts = _legend_texts(figure)
    assert any("lost top" in t for t in texts) and "receptive field" in texts
    assert any("band" in t for t in texts), "the grey stride bands have no key"
    assert any("limits the tile stride" in t for t in texts), "the red line has no key"
    worst = limiting_layer(profile)
    assert artist(figure, "limiting-layer").get_xdata()[0] == worst
    labels = {t.get_text(): t for t in field_ax.get_xticklabels()}
    growth = border_increase(profile)[worst]
    assert labels[f"{profile[worst].path} +{growth} px"].get_color() == "tab:red"
    assert [t.get_text().split(" +")[0] for t in field_ax.get_xticklabels()] == [p.path for p in profile]


def test_profile_fonts_are_legible_at_notebook_width(engine: StreamingCNN) -> None:
    figure = plot_receptive_profile(engine.geometry.profile(64), tile_size=64)
    figure.canvas.draw()
    assert figure.get_figwidth() <= 9.0
    texts = [*figure.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))]
    shown = [t for t in texts if t.get_text() and t.get_visible()]
    assert shown and min(t.get_fontsize() for t in shown) >= 9


def test_nothing_lost_is_said_in_words_not_drawn_as_an_empty_axis() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(), nn.MaxPool2d(4), nn.AvgPool2d(8))
    profile = StreamingCNN(trunk, tile_size=2048).geometry.profile(2048)
    assert not any(any(layer.lost) for layer in profile)
    figure = plot_receptive_profile(profile, tile_size=2048)
    lost_ax = figure.axes[0]
    (sentence,) = [t for t in lost_ax.texts if t.get_gid() == "nothing-lost"]
    assert "no border (and no gradient) is lost at 2048-px tiles" in sentence.get_text()
    assert not lost_ax.get_lines() and not list(lost_ax.get_yticks())
    assert not [a for a in lost_ax.get_children() if a.get_gid() == "limiting-layer"]


def test_profile_on_one_given_axes_keys_the_twin_axis(engine: StreamingCNN) -> None:
    figure = Figure()
    ax = figure.add_subplot()
    assert plot_receptive_profile(engine.geometry.profile(64), ax=ax) is figure
    twin = [a for a in figure.axes if a is not ax]
    assert len(twin) == 1 and twin[0].get_ylabel().startswith("receptive field")
    assert "receptive field (right axis)" in [t.get_text() for t in twin[0].get_legend().get_texts()]
    quiet = Figure()
    plot_receptive_profile(engine.geometry.profile(64), ax=quiet.add_subplot(), legend=False)
    assert all(a.get_legend() is None for a in quiet.axes) and not quiet.legends


def test_profile_plot_draws_stage_cuts(engine: StreamingCNN) -> None:
    profile = engine.geometry.profile(64)
    figure = plot_receptive_profile([profile[:2], profile[2:]], cuts=[profile[0].path], mark_limiting=False)
    ax = figure.axes[0]
    cuts = [a for a in ax.get_children() if a.get_gid() == "stage-cut"]
    assert sorted(line.get_xdata()[0] for line in cuts) == [0.5, 1.5]
    assert not [a for a in ax.get_children() if a.get_gid() == "limiting-layer"]
    assert "stage cut" in _legend_texts(figure)


def test_asymmetric_sides_get_their_own_curves() -> None:
    figure = plot_receptive_profile([layer("a", (1, 2, 3, 4)), layer("b", (2, 4, 6, 8), stride=2)])
    assert {"lost top", "lost left", "lost bottom", "lost right"} <= set(_legend_texts(figure))
