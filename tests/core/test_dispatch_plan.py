"""The stage memory the kept maps leave over buys fewer runs: kept graphs, larger tiles, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightstream import StreamingCNN
from lightstream.core.stages import tile_values
from tests.conftest import assert_streaming_exact
from tests.core.test_tile_batching import DispatchCounter

pytestmark = pytest.mark.usefixtures("gpu_planning")  # spare memory buys larger runs as on a GPU


def _staged_trunk() -> nn.Sequential:
    """Four downsampling children after a stride-4 stem: three stage cuts (float64, eval)."""
    torch.manual_seed(0)

    def down(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU())

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
                          down(4, 6), down(6, 8), down(8, 8), nn.Conv2d(8, 5, 3, padding=1))
    for module in trunk.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return trunk.double().eval()


SHAPE = (1, 3, 256, 256)


def _plans(memory: int) -> list:
    return StreamingCNN(_staged_trunk(), tile_size=64, stage_memory=memory).stage_plans(SHAPE)


def test_spare_stage_memory_runs_the_deepest_stages_as_one_kept_tile_exactly() -> None:
    memory = 1 << 26
    plans = _plans(memory)
    assert len(plans) >= 3 and len(plans[0].plan) > 1
    assert [len(p.plan) for p in plans[1:]].count(1) >= 2  # no recompute for those stages
    image = torch.randn(SHAPE, dtype=torch.float64)
    assert_streaming_exact(_staged_trunk(), image, 64, stage_memory=memory)


def test_without_spare_stage_memory_later_tiles_keep_the_tile_budget() -> None:
    scnn = StreamingCNN(_staged_trunk(), tile_size=64, stage_memory=1)
    plans = scnn.stage_plans(SHAPE)
    whole = scnn.planner.stages(())[0]
    budget = tile_values(whole, scnn.planner.costs([whole], 3)[0], (64, 64))
    costs = scnn.planner.costs([p.stage for p in plans], 3)
    for plan, cost in zip(plans[1:], costs[1:]):  # no spare: nothing beyond one tile's budget
        assert tile_values(plan.stage, cost, plan.tile_size) <= budget or plan.tile_size == plan.stage.geometry.receptive_field


def test_kept_graphs_and_tiles_stay_within_the_tile_budget_plus_the_spare_memory() -> None:
    for memory in (1 << 18, 1 << 20, 1 << 22, 1 << 26):
        scnn = StreamingCNN(_staged_trunk(), tile_size=64, stage_memory=memory)
        plans = scnn.stage_plans(SHAPE)
        planner = scnn.planner
        whole = planner.stages(())[0]
        budget = tile_values(whole, planner.costs([whole], 3)[0], (64, 64))
        costs = planner.costs([p.stage for p in plans], 3)
        maps = sum(planner._map_bytes([p.stage for p in plans], costs, plans[0] and scnn.stream_plan(SHAPE).request))
        limit = budget + max(0, memory - maps) / 8  # values (float64)
        held = 0.0
        for plan, cost in list(zip(plans, costs))[1:]:
            values = tile_values(plan.stage, cost, plan.tile_size)
            assert held + values * plan.tile_batch <= limit * (1 + 1e-9)
            held += values if len(plan.plan) == 1 else 0.0


def test_spare_stage_memory_dispatches_fewer_operations() -> None:
    image = torch.randn(SHAPE, dtype=torch.float64)
    totals = {}
    for memory in (1, 1 << 26):
        scnn = StreamingCNN(_staged_trunk(), tile_size=64, stage_memory=memory)
        assert all(p.batches for p in scnn.stage_plans(SHAPE))  # plan outside the count
        with DispatchCounter() as counter:
            out = scnn(image)
            scnn.backward(image, torch.ones_like(out))
        totals[memory] = sum(counter.counts.values())
    assert totals[1 << 26] < 0.7 * totals[1]
