"""TileTunerModel: the tuner's state, driven without any widget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightstream import StreamingCNN
from lightstream.widgets import TileTunerModel, default_tile_sizes, streaming_network

SIZES = [8, 16, 32, 64]


def test_valid_tile_has_plan_estimate_and_profile(trunk: nn.Module) -> None:
    model = TileTunerModel(trunk, torch.rand(1, 3, 96, 96), SIZES, tile_size=32)
    assert model.warning is None
    assert model.plan is not None and model.estimate is not None
    assert model.estimate.tiles >= len(model.plan) > 1  # the estimate counts the tiles of every stage
    assert model.estimate.peak_bytes > 0 and model.estimate.relative_time > 1
    assert len(model.profiles) == 1 and model.profiles[0][-1].lost[0] > 0
    assert model.minimum_tile_size == 12


def test_too_small_tile_warns_with_the_minimum_instead_of_raising(trunk: nn.Module) -> None:
    model = TileTunerModel(trunk, torch.rand(1, 3, 96, 96), SIZES, tile_size=32)
    model.tile_size = 8
    assert model.plan is None and model.estimate is None
    assert "8 px is too small" in model.warning and "smallest valid tile is 12 px" in model.warning
    model.tile_size = 16
    assert model.warning is None and model.plan is not None


def test_more_tiles_at_smaller_sizes(trunk: nn.Module) -> None:
    model = TileTunerModel(trunk, (256, 256), SIZES)
    counts = []
    for size in (16, 32, 64):
        model.tile_size = size
        counts.append(len(model.plan))
    assert counts[0] > counts[1] > counts[2]


def test_streaming_cnn_is_planned_with_a_copy_and_applied_on_request(trunk: nn.Module) -> None:
    engine = StreamingCNN(trunk, tile_size=48)
    model = TileTunerModel(engine, (128, 128), SIZES)
    assert model.tile_size == 48 and model.tile_sizes == [8, 16, 32, 48, 64]  # the engine's plan, added
    model.tile_size = 64
    assert engine.tile_size == (48, 48)  # untouched until apply()
    model.apply()
    assert engine.tile_size == (64, 64)


def test_streaming_module_is_duck_typed(trunk: nn.Module) -> None:
    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stream_network = StreamingCNN(trunk, tile_size=16)

    wrapper = Module()
    assert streaming_network(wrapper) is wrapper.stream_network
    assert streaming_network(trunk) is None
    model = TileTunerModel(wrapper, (64, 64), SIZES)
    assert model.trunk is trunk and model.tile_size == 16


def test_bare_trunk_cannot_be_applied(trunk: nn.Module) -> None:
    model = TileTunerModel(trunk, (64, 64), SIZES)
    assert model.tile_size == 32  # smallest option of at least twice the 12 px minimum
    with pytest.raises(TypeError, match="bare trunk"):
        model.apply()


class _Slide:
    """What the data helper's lazy slide offers: shape, thumbnail and read."""

    shape = (1, 3, 400, 200)

    def __init__(self) -> None:
        self.reads = 0

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        return np.zeros((40, 20, 3), dtype=np.uint8)

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        self.reads += 1
        return torch.zeros(1, 3, rows.stop - rows.start, cols.stop - cols.start, dtype=torch.uint8)


@pytest.mark.parametrize(("image", "shape", "thumb"), [
    (torch.rand(3, 50, 60), (1, 3, 50, 60), (50, 60, 3)),
    (np.zeros((50, 60, 3), dtype=np.uint8), (1, 3, 50, 60), (50, 60, 3)),
    ((50, 60), (1, 3, 50, 60), None),
    ((2, 3, 50, 60), (2, 3, 50, 60), None),
    (_Slide(), (1, 3, 400, 200), (40, 20, 3)),
])
def test_image_kinds(trunk: nn.Module, image: object, shape: tuple[int, ...],
                     thumb: tuple[int, ...] | None) -> None:
    model = TileTunerModel(trunk, image, SIZES)
    assert model.image_shape == shape
    assert (model.thumbnail.shape if model.thumbnail is not None else None) == thumb


def test_measure_step_runs_forward_and_backward_without_touching_grads(trunk: nn.Module) -> None:
    model = TileTunerModel(trunk, torch.rand(1, 3, 64, 64), SIZES, tile_size=32)
    result = model.measure_step()
    assert result is model.measurement
    assert result.tile_size == 32 and result.seconds > 0 and result.backward
    assert result.peak_bytes > 0 and result.rss_bytes >= 0 and result.device == "cpu"
    assert result.memory_label == "tensor peak (CPU allocator events)"
    assert all(p.grad is None for p in trunk.parameters())


def test_measure_step_reads_a_lazy_slide(trunk: nn.Module) -> None:
    slide = _Slide()
    model = TileTunerModel(trunk, slide, SIZES, tile_size=64)
    model.measure_step()
    assert slide.reads == 2 * len(model.plan)  # forward and backward read every tile, at most the tile size


def test_measure_step_refuses_an_invalid_tile(trunk: nn.Module) -> None:
    model = TileTunerModel(trunk, (64, 64), SIZES, tile_size=8)
    with pytest.raises(ValueError, match="smallest valid tile is 12 px"):
        model.measure_step()


def test_default_tile_sizes() -> None:
    sizes = default_tile_sizes(minimum=427, output_stride=32, image_side=4000)
    assert sizes.step == 128 and sizes[0] == 128 and sizes[-1] == 4096
    assert default_tile_sizes(minimum=12, output_stride=1, image_side=10)[-1] == 32
    assert default_tile_sizes(minimum=427, output_stride=32, image_side=100_000)[-1] == 16384


def test_a_staged_engine_is_planned_with_its_stages(trunk: nn.Module) -> None:
    engine = StreamingCNN(trunk, tile_size=32, stages=[3])
    model = TileTunerModel(engine, (256, 256), [2, 8, 16, 32, 64])
    assert model.tile_size == 32
    assert model.stage_options == {"stages": (3,), "stage_memory": engine.stage_memory}
    assert len(model.stage_plans) == 2 and len(model.profiles) == 2
    assert model.plan is model.stage_plans[0].plan
    # the second stage reads the first stage's map (stride 2): its borders are drawn in image px
    (first_layer, *_), input_stride = model.profiles[1], model.stage_plans[1].stage.input_stride
    assert input_stride == (2, 2) and first_layer.stride[0] % 2 == 0 and first_layer.lost[0] % 2 == 0
    unstaged = TileTunerModel(trunk, (256, 256), [8, 16, 32, 64], tile_size=32)
    assert model.estimate.recompute_factor < unstaged.estimate.recompute_factor
    assert model.minimum_tile_size == 4 < unstaged.minimum_tile_size  # only the first stage's field counts
    model.tile_size = 2
    assert "smallest valid tile is 4 px" in model.warning and model.profiles == []


def test_tile_size_options_give_distinct_plans(trunk: nn.Module) -> None:
    sides = list(range(4, 257, 4))
    model = TileTunerModel(trunk, (200, 200), sides)
    keys = [model.plan_key(side) for side in model.tile_sizes]
    assert len(set(keys)) == len(keys) < len(sides)  # no two options plan alike; many sides collapsed
    assert {model.plan_key(side) for side in sides} == set(keys)  # yet every plan is offered
    assert model.tile_sizes[0] == 8 and model.tile_sizes[1] == 12  # the largest too-small side, then the minimum
    assert model.tile_sizes[-1] < 256  # the sides past the image all give its single tile: one option
    model.tile_size = model.tile_sizes[-1]
    assert len(model.plan) == 1


def test_an_engine_tile_with_an_offered_plan_snaps_to_that_option(trunk: nn.Module) -> None:
    engine = StreamingCNN(trunk, tile_size=1000)
    model = TileTunerModel(engine, (64, 64), SIZES)  # one tile of the whole image, as at 64 px
    assert model.tile_size == 64 and model.tile_sizes == SIZES
    assert model.plan_key(1000) == model.plan_key(64)
