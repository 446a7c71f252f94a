"""plot_receptive_profile and the choice of the layer that limits the tile stride."""

from __future__ import annotations

from collections.abc import Callable

import pytest

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


def test_profile_plot_marks_sides_limit_and_equal_directions(
    engine: StreamingCNN, artist: Callable
) -> None:
    profile = engine.geometry.profile(64)
    figure = plot_receptive_profile(profile, tile_size=64)
    ax = figure.axes[0]
    title = ax.get_title()
    top, left, bottom, right = profile[-1].lost
    assert "forward = backward" in title
    assert f"{64 - top - bottom}×{64 - left - right} px" in title
    labels = ax.get_legend().get_texts()
    assert any("lost top" in t.get_text() for t in labels)
    assert any("receptive field" in t.get_text() for t in labels)
    assert artist(figure, "limiting-layer").get_xdata()[0] == limiting_layer(profile)
    assert [t.get_text() for t in ax.get_xticklabels()] == [p.path for p in profile]


def test_profile_plot_draws_stage_cuts(engine: StreamingCNN) -> None:
    profile = engine.geometry.profile(64)
    figure = plot_receptive_profile([profile[:2], profile[2:]], cuts=[profile[0].path], mark_limiting=False)
    ax = figure.axes[0]
    cuts = [a for a in ax.get_children() if a.get_gid() == "stage-cut"]
    assert sorted(line.get_xdata()[0] for line in cuts) == [0.5, 1.5]
    assert not [a for a in ax.get_children() if a.get_gid() == "limiting-layer"]
    assert any(t.get_text() == "stage cut" for t in ax.get_legend().get_texts())


def test_asymmetric_sides_get_their_own_curves() -> None:
    figure = plot_receptive_profile([layer("a", (1, 2, 3, 4)), layer("b", (2, 4, 6, 8), stride=2)])
    texts = {t.get_text() for t in figure.axes[0].get_legend().get_texts()}
    assert {"lost top", "lost left", "lost bottom", "lost right"} <= texts
