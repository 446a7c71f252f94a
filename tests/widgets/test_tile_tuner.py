"""TileTuner: moving the slider programmatically changes what the widget shows."""

from __future__ import annotations

import base64
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from lightstream import StreamingCNN
from lightstream.core.planner import Planner
from lightstream.widgets import TileTuner

SIZES = [8, 16, 32, 64]
PNG = b"\x89PNG"


def boxes_drawn(tuner: TileTuner) -> int:
    (boxes,) = [a for a in tuner.grid_figure.axes[0].get_children() if a.get_gid() == "input-boxes"]
    return len(boxes.get_paths())


def test_slider_redraws_counts_and_grid(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, torch.rand(1, 3, 128, 128), SIZES, tile_size=64)
    assert tuner.tile_size == 64 and tuner.slider.value == 64
    stats_before, png_before, boxes_before = tuner.stats.value, tuner.grid_image.value, boxes_drawn(tuner)
    assert f">{len(tuner.model.plan)} (" in stats_before and bytes(png_before).startswith(PNG)

    tuner.slider.value = 16
    assert tuner.tile_size == 16 == tuner.model.tile_size
    assert tuner.stats.value != stats_before
    assert f'class="lightstream-tile-count">{len(tuner.model.plan)} (' in tuner.stats.value
    assert boxes_drawn(tuner) == len(tuner.model.plan) > boxes_before
    assert bytes(tuner.grid_image.value) != bytes(png_before)
    assert "estimated peak memory" in tuner.stats.value and tuner.warning.value == ""


def test_too_small_tile_shows_a_warning_not_an_error(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, torch.rand(1, 3, 128, 128), SIZES, tile_size=32)
    tuner.slider.value = 8
    assert "smallest valid tile is 12 px" in tuner.warning.value
    assert 'class="lightstream-tile-count">—<' in tuner.stats.value
    assert tuner.measure_button.disabled
    assert not [a for a in tuner.grid_figure.axes[0].get_children() if a.get_gid() == "input-boxes"]
    assert tuner.measure_step() is None

    tuner.tile_size = 32  # the setter moves the slider
    assert tuner.slider.value == 32 and tuner.warning.value == "" and not tuner.measure_button.disabled


def test_tile_size_set_in_code_snaps_to_the_option_with_the_same_plan(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, (64, 64), SIZES)
    tuner.tile_size = 100  # larger than the image: the same single tile as 64 px
    assert tuner.slider.value == 64 == tuner.tile_size and list(tuner.slider.options) == SIZES
    tuner.tile_size = 20  # a plan no option gives: added to the slider
    assert tuner.slider.value == 20 and 20 in tuner.slider.options
    assert "tile 20 px on a 64 × 64 px image" in tuner.stats.value
    with pytest.raises(ValueError, match="tile_size must be a positive number of pixels"):
        tuner.tile_size = 0


def test_slider_and_engine_stay_in_sync_both_ways(trunk: nn.Module) -> None:
    engine = StreamingCNN(trunk, tile_size=32)
    tuner = TileTuner(engine, (128, 128), SIZES)
    tuner.slider.value = 16  # the slider sets the engine
    assert engine.tile_size == (16, 16)
    tuner.slider.value = 8  # too small: the engine keeps its last valid tile
    assert engine.tile_size == (16, 16)
    engine.tile_size = 64  # code sets the engine: the slider follows at the next sync (after each cell)
    tuner.sync()
    assert tuner.slider.value == 64 and f">{len(tuner.model.plan)} (" in tuner.stats.value
    assert len(tuner.model.plan) == len(engine.plan((128, 128)))


def test_profile_is_rendered_again_only_when_it_changes(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, (256, 256), [16, 32, 64], tile_size=32)
    profile_png = tuner.profile_image.value
    assert bytes(profile_png).startswith(PNG)
    tuner.slider.value = 64  # this trunk's interior tiles lose the same border at 32 and 64 px
    assert tuner.profile_image.value is profile_png
    tuner.model.profiles = []  # as if the geometry changed: the profile is drawn again
    tuner.redraw()
    assert tuner.profile_image.value is not profile_png


def test_measure_button_reports_a_real_step(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, torch.rand(1, 3, 64, 64), SIZES, tile_size=32)
    thread = tuner.measure_step(wait=True)
    assert thread is not None and not thread.is_alive()
    assert "measured at 32 px on cpu" in tuner.measurement.value
    assert "vs estimated" in tuner.measurement.value
    assert tuner.model.measurement.seconds > 0 and not tuner.measure_button.disabled

    tuner.measure_button.click()  # the button starts the same background measurement
    deadline = time.monotonic() + 30
    while tuner._measuring is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "measured at 32 px" in tuner.measurement.value


def test_failed_measurement_is_shown_in_the_widget(trunk: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = TileTuner(trunk, (64, 64), SIZES, tile_size=32)

    def broken(**_progress_and_cancel: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tuner.model, "measure_step", broken)
    tuner.measure_step(wait=True)
    assert "step failed" in tuner.measurement.value and "out of memory" in tuner.measurement.value
    assert not tuner.measure_button.disabled


def test_unlinked_tuner_sets_the_engine_only_on_apply(trunk: nn.Module) -> None:
    engine = StreamingCNN(trunk, tile_size=16)
    tuner = TileTuner(engine, (64, 64), SIZES, link=False)
    tuner.slider.value = 64
    assert engine.tile_size == (16, 16)
    tuner.apply()
    assert engine.tile_size == (64, 64)


def test_widget_displays_as_a_widget_view_with_a_static_fallback(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, (64, 64), SIZES)
    bundle = tuner._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == tuner.widget.model_id
    assert base64.b64decode(bundle["image/png"]) == bytes(tuner.grid_image.value)
    assert base64.b64decode(bundle["image/png"]).startswith(PNG)
    assert bundle["text/html"].count('<img src="data:image/png;base64,') == 2
    assert tuner.stats.value in bundle["text/html"]


def test_a_slider_move_neither_traces_nor_plans_again(trunk: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option's plan is made once when the tuner is built; moving the slider reuses it."""
    tuner = TileTuner(StreamingCNN(trunk, tile_size=32), (256, 256), [16, 24, 32, 48, 64, 128])
    calls = {"trace": 0, "plan": 0}
    make_plan, init = Planner._make_plan, Planner.__init__

    def counted_plan(self: Planner, *args: object) -> object:
        calls["plan"] += 1
        return make_plan(self, *args)

    def counted_init(self: Planner, *args: object, **kwargs: object) -> None:
        calls["trace"] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(Planner, "_make_plan", counted_plan)
    monkeypatch.setattr(Planner, "__init__", counted_init)
    for side in [*tuner.slider.options, *reversed(tuner.slider.options)]:
        tuner.slider.value = side
        assert f">{len(tuner.model.plan)} (" in tuner.stats.value
    assert calls == {"trace": 0, "plan": 0}


def test_measurement_shows_progress_and_can_be_cancelled(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, torch.rand(1, 3, 128, 128), SIZES, tile_size=16)
    seen: list[tuple[int, int]] = []

    def cancel_at_the_third_run(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 3:
            tuner.cancel()

    tuner._on_progress = cancel_at_the_third_run  # type: ignore[method-assign]
    tuner.measure_step(wait=True)
    total = seen[0][1]
    assert [done for done, _ in seen] == [1, 2, 3] and total > 3
    assert "cancelled after" in tuner.measurement.value and tuner.model.measurement is None
    assert tuner.cancel_button.disabled and not tuner.measure_button.disabled

    del tuner._on_progress  # a full step afterwards: the trunk and tuner are usable, no hook left
    tuner.measure_step(wait=True)
    result = tuner.model.measurement
    assert result is not None and result.tile_runs == total == tuner.progress.max == tuner.progress.value
    assert all(not m._forward_pre_hooks for m in trunk.modules())
    assert all(p.grad is None for p in trunk.parameters())


def test_measurement_compares_tensor_peaks_and_names_rss_apart(trunk: nn.Module,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = TileTuner(trunk, torch.rand(1, 3, 64, 64), SIZES, tile_size=32)
    tuner.measure_step(wait=True)
    text = tuner.measurement.value
    assert "tensor peak" in text and "vs estimated" in text
    assert "process RSS growth" in text and "allocator caching and library pages" in text
    measured = tuner.model.measurement
    assert measured is not None and measured.peak_bytes > 0
    half = replace(tuner.model.estimate, peak_bytes=measured.peak_bytes // 2)  # as if the estimate were off
    monkeypatch.setattr(tuner.model, "estimate", half)
    tuner.measure_step(wait=True)
    assert "× the estimate" in tuner.measurement.value and "more" in tuner.measurement.value


def test_a_staged_engine_shows_its_stages(trunk: nn.Module) -> None:
    tuner = TileTuner(StreamingCNN(trunk, tile_size=32, stages=[3]), (256, 256), [2, 8, 16, 32, 64])
    first, second = tuner.model.stage_plans
    assert f"{first.stage.name}: {len(first.plan)} × 32" in tuner.stats.value
    assert f"{second.stage.name}: {len(second.plan)} × {second.tile_size[0]}" in tuner.stats.value
    profile_ax = tuner.profile_figure.axes[0]
    assert len([a for a in profile_ax.get_children() if a.get_gid() == "stage-cut"]) == 1
    assert len([a for a in profile_ax.get_children() if a.get_gid() == "limiting-layer"]) == 2
