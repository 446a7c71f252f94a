"""Tile geometry is exact, partitions the feature map, and is integer work a slider can redo."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN
from tests.core.test_tile_batching import DispatchCounter


@pytest.fixture(scope="module")
def resnet50() -> StreamingCNN:
    return StreamingCNN(nn.Sequential(*list(models.resnet50().children())[:-2]).eval(), tile_size=1024,
                        stages=None)


def test_a_new_tile_size_is_planned_by_integer_geometry_alone(resnet50: StreamingCNN,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps the tile slider fast: once a trunk is traced and its layers probed, a new tile
    size dispatches no tensor operation and probes nothing again (``benchmarks/tile_geometry.py``
    times it)."""
    resnet50.plan((16384, 12288))  # the first plan probes the layers' costs (shapes only), once
    probe, probes = resnet50.planner.cost_model, []
    monkeypatch.setattr(resnet50.planner, "cost_model", lambda *args: probes.append(args) or probe(*args))
    for tile in (600, 1000, 1500, 2600, 4096):
        with DispatchCounter() as ops:
            resnet50.tile_size = (tile, tile)
            plan = resnet50.plan((16384, 12288))
            profile = resnet50.geometry.profile(tile)
        assert sum(ops.counts.values()) == 0, (tile, ops.counts)
        assert len(plan) > 1 and len(profile) == 53 + 1  # 53 convolutions and the max pool
    assert probes == []


def test_resnet_receptive_field_and_output_stride_are_the_known_values(resnet50: StreamingCNN) -> None:
    assert resnet50.geometry.output_stride == (32, 32)
    # torchvision's ResNet-50 is "v1.5" (stride in the 3x3 conv): 427 px, not v1's 483 px.
    assert resnet50.geometry.receptive_field == (427, 427)
    resnet18 = StreamingCNN(nn.Sequential(*list(models.resnet18().children())[:-2]).eval(), tile_size=1024,
                            stages=None)
    assert resnet18.geometry.receptive_field == (435, 435)


@pytest.mark.parametrize("image_size", [(1000, 1000), (777, 1301), (5000, 333)])
def test_tile_outputs_partition_the_feature_map_and_inputs_fit_the_tile(resnet50: StreamingCNN,
                                                                        image_size: tuple[int, int]) -> None:
    resnet50.tile_size = (640, 700)
    plan = resnet50.plan(image_size)
    assert plan.output_size == resnet50.geometry.output_size(image_size)
    owned = torch.zeros(plan.output_size, dtype=torch.int64)
    for tile in plan.tiles:
        owned[tile.output.rows, tile.output.cols] += 1
        assert tile.input.height <= 640 and tile.input.width <= 700
        assert 0 <= tile.input.top < tile.input.bottom <= image_size[0]
        assert 0 <= tile.input.left < tile.input.right <= image_size[1]
    assert torch.all(owned == 1)


def test_interior_tiles_advance_by_a_multiple_of_the_output_stride(resnet50: StreamingCNN) -> None:
    resnet50.tile_size = (1024, 1024)
    plan = resnet50.plan((8192, 8192))
    sizes = {(o[1] - o[0]) for _, o in plan.row_spans[1:-1]}
    cells = (1024 - 427) // 32 + 1
    assert sizes == {cells}
    assert plan.tile_stride == (cells * 32, cells * 32)


def test_lost_border_grows_through_the_trunk_and_ends_near_half_the_receptive_field() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2))
    profile = StreamingCNN(trunk, tile_size=64).geometry.profile(64)
    assert [p.lost for p in profile] == [(1, 1, 1, 1), (2, 2, 2, 2), (4, 4, 4, 4)]
    assert [p.receptive_field for p in profile] == [(3, 3), (5, 5), (9, 9)]


def test_geometry_fingerprint_changes_with_the_architecture_only() -> None:
    a = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3)), tile_size=32).geometry.fingerprint
    b = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3)), tile_size=64).geometry.fingerprint
    c = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 5)), tile_size=32).geometry.fingerprint
    assert a == b != c
