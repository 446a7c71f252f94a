"""TileTuner: moving the slider programmatically changes what the widget shows."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torchvision
from torch import nn

from lightstream import StreamingCNN
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


def test_tile_size_setter_rejects_values_off_the_slider(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, (64, 64), SIZES)
    with pytest.raises(ValueError, match="not one of the slider's tile sizes"):
        tuner.tile_size = 20


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
    assert "estimated peak" in tuner.measurement.value
    assert tuner.model.measurement.seconds > 0 and not tuner.measure_button.disabled

    tuner.measure_button.click()  # the button starts the same background measurement
    deadline = time.monotonic() + 30
    while tuner._measuring is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "measured at 32 px" in tuner.measurement.value


def test_failed_measurement_is_shown_in_the_widget(trunk: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = TileTuner(trunk, (64, 64), SIZES, tile_size=32)

    def broken() -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tuner.model, "measure_step", broken)
    tuner.measure_step(wait=True)
    assert "step failed" in tuner.measurement.value and "out of memory" in tuner.measurement.value
    assert not tuner.measure_button.disabled


def test_apply_sets_the_tile_size_of_the_given_engine(trunk: nn.Module) -> None:
    engine = StreamingCNN(trunk, tile_size=16)
    tuner = TileTuner(engine, (64, 64), SIZES)
    tuner.slider.value = 64
    assert engine.tile_size == (16, 16)
    tuner.apply()
    assert engine.tile_size == (64, 64)


def test_widget_displays_as_a_widget_view(trunk: nn.Module) -> None:
    tuner = TileTuner(trunk, (64, 64), SIZES)
    bundle = tuner._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == tuner.widget.model_id


@pytest.mark.slow
def test_resnet50_redraw_is_under_a_second() -> None:
    """Plan, estimate and grid figure for a new tile size of a ResNet-50 on a 4096² image.

    Timed in CPU seconds of this thread (the redraw is single-threaded), so a busy machine
    does not fail it; ``last_redraw_seconds`` reports the wall time.
    """
    resnet = torchvision.models.resnet50()
    trunk = nn.Sequential(*list(resnet.children())[:-2]).eval()
    tuner = TileTuner(trunk, torch.rand(1, 3, 4096, 4096))
    assert tuner.model.minimum_tile_size == 11  # staged by default: the stem's receptive field
    times = []
    for size in (512, 768, 1024, 2048, 256, 1536):
        start = time.thread_time()
        tuner.slider.value = size
        times.append(time.thread_time() - start)
    assert statistics.median(times) < 1.0, times


def test_a_staged_engine_shows_its_stages(trunk: nn.Module) -> None:
    tuner = TileTuner(StreamingCNN(trunk, tile_size=32, stages=[3]), (256, 256), [2, 8, 16, 32, 64])
    first, second = tuner.model.stage_plans
    assert f"{first.stage.name}: {len(first.plan)} × 32" in tuner.stats.value
    assert f"{second.stage.name}: {len(second.plan)} × {second.tile_size[0]}" in tuner.stats.value
    profile_ax = tuner.profile_figure.axes[0]
    assert len([a for a in profile_ax.get_children() if a.get_gid() == "stage-cut"]) == 1
    assert len([a for a in profile_ax.get_children() if a.get_gid() == "limiting-layer"]) == 2
