"""The step estimate counts what autograd really keeps, from a shape-only pass."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN
from lightstream.core.estimate import layer_costs
from lightstream.core.graph import TrunkGraph


def _saved_bytes(trunk: nn.Module, image: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in a real forward."""
    parameters = {t.untyped_storage().data_ptr() for t in [*trunk.parameters(), *trunk.buffers(), image]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trunk(image)
    return sum(storages.values())


def _predicted_saved_bytes(trunk: nn.Module, size: int) -> float:
    graph = TrunkGraph(trunk)
    costs = layer_costs(graph, 3)
    sizes = graph.sizes(size, size)
    return 4 * sum(costs[i].saved_per_pixel * sizes[i][0] * sizes[i][1]
                   for i, step in enumerate(graph.steps) if step.spatial)


def test_saved_values_per_pixel_reproduce_autograds_saved_bytes_on_a_resnet() -> None:
    trunk = nn.Sequential(*list(models.resnet18().children())[:-3]).eval()  # to layer3
    image = torch.randn(1, 3, 320, 320, requires_grad=True)
    assert _predicted_saved_bytes(trunk, 320) == _saved_bytes(trunk, image)


def test_saved_values_skip_parameters_and_count_pooling_indices() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)).eval()
    costs = layer_costs(TrunkGraph(trunk), 3)
    conv, pool, conv2 = costs[1], costs[2], costs[3]
    assert conv.saved_per_pixel == 0  # it saves its input (the caller's) and its weight only
    assert pool.saved_per_pixel == 4 * 8 + 2 * 8  # its input (4 px per output px) + int64 indices
    assert conv2.saved_per_pixel == 8  # the pooled map it reads


def test_whole_image_memory_grows_with_area_and_streamed_memory_is_bounded() -> None:
    trunk = nn.Sequential(*list(models.resnet18().children())[:-2]).eval()
    scnn = StreamingCNN(trunk, tile_size=512, stages=None)
    small, large = (scnn.estimate((1, 3, size, size)) for size in (4096, 16384))
    assert large.whole_image_bytes > 15 * small.whole_image_bytes
    fmap_growth = large.feature_map_bytes - small.feature_map_bytes
    assert large.peak_bytes - small.peak_bytes <= 2 * fmap_growth  # the map and its gradient only
    assert large.stage_map_bytes == small.stage_map_bytes == 0


def test_the_estimate_and_the_automatic_stages_work_for_a_trunk_off_the_cpu() -> None:
    # the shape-only probe runs where the trunk lives; "meta" stands in for a GPU here
    def trunk() -> nn.Sequential:
        return nn.Sequential(*list(models.resnet18(weights=None).children())[:-2]).eval()

    shape = (1, 3, 2048, 2048)
    on_cpu, on_meta = StreamingCNN(trunk(), tile_size=512), StreamingCNN(trunk().to("meta"), tile_size=512)
    assert [p.stage.name for p in on_meta.stage_plans(shape)] == [p.stage.name for p in on_cpu.stage_plans(shape)]
    cpu, meta = on_cpu.estimate(shape), on_meta.estimate(shape)
    assert meta.tiles == cpu.tiles == 46 and meta.relative_time == cpu.relative_time
    assert abs(meta.peak_bytes / cpu.peak_bytes - 1) < 0.01
