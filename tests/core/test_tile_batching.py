"""Tiles that run identical operations run as one batch: exactly, fewer ops, within the memory budget."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightstream import StreamingCNN
from lightstream.core.batching import batch_tiles, batch_unsafe_reason
from lightstream.core.graph import TrunkGraph
from lightstream.core.stages import tile_values
from tests.conftest import assert_streaming_exact, relative_error, small_trunk, whole_image_reference
from tests.core.test_exactness_awkward import Residual, _bn


class DispatchCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class LazyImage:
    """An image source that is not a tensor (read tile by tile, prefetched by the engine)."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image, self.reads = image, 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        self.reads += 1
        return self.image[:, :, rows, cols].clone()


def _awkward() -> nn.Module:
    """Strides, asymmetric padding, dilation, ceil-mode pooling and a strided residual."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2)), _bn(4), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
        Residual(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), _bn(6)), nn.Conv2d(4, 6, 1, stride=2)),
        nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(6, 5, 3, padding=1),
    ).double().eval()


def _batched(scnn: StreamingCNN, shape: tuple[int, ...]) -> int:
    """The largest batch any stage of the plan runs."""
    return max(stage.tile_batch for stage in scnn.stage_plans(shape))


@pytest.mark.slow
@pytest.mark.parametrize("stages", [None, "auto"])
def test_batched_tiles_of_an_awkward_trunk_are_exact(stages) -> None:
    image = torch.randn(2, 3, 280, 330, dtype=torch.float64)
    scnn = assert_streaming_exact(_awkward(), image, (100, 110), stages=stages, stage_memory=1 << 22, tile_batch=4)
    assert min(scnn.stage_plans(image.shape)[0].plan.grid) >= 3
    assert _batched(scnn, image.shape) > 1


def test_batched_tiles_with_explicit_stages_and_a_kept_single_tile_stage_are_exact() -> None:
    trunk = _awkward()
    image = torch.randn(2, 3, 230, 170, dtype=torch.float64)
    scnn = assert_streaming_exact(trunk, image, 60, stages=[3, 5], tile_batch=3)
    assert all(stage.tile_batch <= 3 for stage in scnn.stage_plans(image.shape))
    assert _batched(scnn, image.shape) == 3


def test_batched_forward_autograd_from_a_lazy_source_is_exact() -> None:
    trunk = small_trunk().double()
    image = torch.randn(2, 3, 97, 130, dtype=torch.float64)
    grad = torch.randn_like(trunk(image))
    expected_out, expected_grads, _ = whole_image_reference(trunk, image, grad)
    source = LazyImage(image)
    scnn = StreamingCNN(trunk, tile_size=32, stages=None, tile_batch=5)
    out = scnn.forward_autograd(source)
    out.backward(grad)
    assert relative_error(out.detach(), expected_out) <= 1e-10
    for param, expected in zip(trunk.parameters(), expected_grads):
        assert relative_error(param.grad, expected) <= 1e-10
    tiles = len(scnn.plan(image.shape))
    assert source.reads == 2 * tiles and _batched(scnn, image.shape) == 5


def test_every_tile_is_in_exactly_one_batch_of_tiles_with_equal_input_shapes() -> None:
    graph = TrunkGraph(_awkward())
    plan = StreamingCNN(_awkward(), tile_size=(100, 110), stages=None).plan((1, 3, 330, 420))
    batches = batch_tiles(graph, plan, 4)
    tiles = [tile for batch in batches for tile in batch.tiles]
    assert sorted(t.index for t in tiles) == sorted(t.index for t in plan.tiles)
    assert all(len(batch) <= 4 for batch in batches) and len(batches) < len(plan)
    for batch in batches:
        assert len({(t.input.height, t.input.width, t.output.height, t.output.width) for t in batch.tiles}) == 1


@pytest.mark.usefixtures("gpu_planning")  # on the CPU, "auto" holds one tile a run
def test_batching_dispatches_fewer_convolutions_than_tiles() -> None:
    trunk = small_trunk()
    image = torch.randn(1, 3, 160, 160)
    counts = {}
    for tile_batch in (1, "auto"):
        scnn = StreamingCNN(trunk, tile_size=40, stages=None, tile_batch=tile_batch)
        assert scnn.stage_plans(image.shape)[0].batches  # plan (and probe costs) outside the count
        with DispatchCounter() as counter:
            out = scnn(image)
            scnn.backward(image, torch.ones_like(out))
        counts[tile_batch] = counter.counts
    tiles = len(scnn.plan(image.shape))
    assert tiles >= 16
    assert counts[1]["convolution"] == 2 * 3 * tiles  # forward and recompute, three convolutions a tile
    stage = scnn.stage_plans(image.shape)[0]
    assert len(stage.batches) == 9  # first, interior, last class per axis
    assert counts["auto"]["convolution"] == 3 * len(stage.forward_batches) + 3 * 9  # the forward's own tiles
    assert sum(counts["auto"].values()) < sum(counts[1].values()) / 2


@pytest.mark.usefixtures("gpu_planning")
def test_auto_tile_batch_fits_the_stage_memory_left_by_the_kept_maps() -> None:
    trunk = small_trunk()
    shape = (2, 3, 400, 400)
    sizes = {}
    for memory in (1, 1 << 20, 1 << 24):
        scnn = StreamingCNN(trunk, tile_size=40, stages=None, stage_memory=memory, tile_batch="auto")
        stage = scnn.stage_plans(shape)[0]
        costs = scnn.planner.costs([stage.stage], 3)[0]
        tile_bytes = 2 * 4 * tile_values(stage.stage, costs, stage.tile_size)
        room = max(0, memory - 2 * scnn.estimate(shape).feature_map_bytes)  # the output map and its gradient
        limit = stage.batch_limit()
        assert (limit - 1) * tile_bytes <= room < limit * tile_bytes
        sizes[memory] = stage.tile_batch
    assert sizes[1] == 1 and 1 < sizes[1 << 20] < sizes[1 << 24]


def test_a_trunk_that_concatenates_along_the_batch_axis_is_never_batched() -> None:
    class Twice(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, 2 * x], 0)

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Twice(), nn.Conv2d(4, 2, 3, padding=1)).double().eval()
    graph = TrunkGraph(trunk)
    assert "concatenates along the batch axis" in (batch_unsafe_reason(graph) or "")
    scnn = StreamingCNN(trunk, tile_size=20, stages=None, tile_batch=8)
    assert _batched(scnn, (1, 3, 64, 64)) == 1
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert relative_error(scnn(image), trunk(image)) <= 1e-10


def test_tile_batch_must_be_a_positive_count_or_auto() -> None:
    for bad in (0, -2, 1.5, "many", True):
        with pytest.raises(ValueError, match="tile_batch"):
            StreamingCNN(small_trunk(), tile_size=40, tile_batch=bad)
