"""The step estimate counts what autograd really keeps, from a shape-only pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN, TimeModel
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


@pytest.mark.usefixtures("gpu_planning")  # both spend the spare memory alike
def test_the_estimate_and_the_automatic_stages_work_for_a_trunk_off_the_cpu() -> None:
    # the shape-only probe runs where the trunk lives; "meta" stands in for a GPU here
    def trunk() -> nn.Sequential:
        return nn.Sequential(*list(models.resnet18(weights=None).children())[:-2]).eval()

    shape = (1, 3, 2048, 2048)
    on_cpu, on_meta = StreamingCNN(trunk(), tile_size=512), StreamingCNN(trunk().to("meta"), tile_size=512)
    cpu_plans, meta_plans = on_cpu.stage_plans(shape), on_meta.stage_plans(shape)
    assert [p.stage.name for p in meta_plans] == [p.stage.name for p in cpu_plans]
    assert [p.plan for p in meta_plans] == [p.plan for p in cpu_plans]
    cpu, meta = (engine.estimate(shape, time_model=TimeModel.for_device(torch.device("cpu")))
                 for engine in (on_cpu, on_meta))
    tiles = sum(len(p.plan) for p in cpu_plans)
    assert meta.tiles == cpu.tiles == tiles > 1
    # the forward's own tiles follow each device's time model: the CPU's pays for fresh pages
    assert sum(len(p.forward_batches) for p in meta_plans) <= sum(len(p.forward_batches) for p in cpu_plans)


@pytest.mark.usefixtures("gpu_planning")  # the spare memory holds the whole image's forward
def test_a_forward_on_larger_tiles_is_estimated_on_its_own_tiles() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    scnn = StreamingCNN(trunk, tile_size=32, stages=None)
    stage, = scnn.stage_plans((1, 3, 64, 64))
    assert len(stage.plan) == 9 and stage.forward_plan is not None and len(stage.forward_plan) == 1
    output_bytes = 8 * 64 * 64 * 4
    model = TimeModel(fresh_memory_cost=10.0, fresh_memory_threshold=output_bytes)
    estimate = scnn.estimate((1, 3, 64, 64), time_model=model)
    # the forward's one tile is the whole image: its three outputs are fresh, once; the backward's
    # 32-px tiles none; the stitched map and its gradient
    assert estimate.fresh_bytes == 3 * output_bytes + 2 * output_bytes
    whole_macs = (8 * 3 * 9 + 8 + 8 * 8 * 9) * 64 * 64
    streamed_macs = estimate.recompute_factor * whole_macs  # the backward's tiles
    expected = ((whole_macs + 3 * streamed_macs + 10.0 * estimate.fresh_bytes)
                / (3 * whole_macs + 10.0 * estimate.whole_image_fresh_bytes))
    assert abs(estimate.relative_time - expected) <= 1e-12


def test_fresh_memory_counts_each_output_past_the_threshold_once_per_pass() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    scnn = StreamingCNN(trunk, tile_size=32, stages=None, tile_batch=1)  # the forward on the same tiles
    output_bytes = 8 * 64 * 64 * 4  # each step's output over the whole 64² image
    model = TimeModel(fresh_memory_cost=10.0, fresh_memory_threshold=output_bytes)
    estimate = scnn.estimate((1, 3, 64, 64), time_model=model)
    # whole image: three outputs past the threshold, each allocated in the forward and as a
    # gradient in the backward; 32-px tiles: none, only the stitched map and its gradient
    assert estimate.whole_image_fresh_bytes == 2 * 3 * output_bytes
    assert estimate.fresh_bytes == 2 * output_bytes
    whole_macs = (8 * 3 * 9 + 8 + 8 * 8 * 9) * 64 * 64  # conv, relu (one per value), conv
    streamed_macs = estimate.recompute_factor * whole_macs
    expected = (4 * streamed_macs + 10.0 * estimate.fresh_bytes) / (3 * whole_macs + 10.0 * estimate.whole_image_fresh_bytes)
    assert abs(estimate.relative_time - expected) <= 1e-12
    multiply_adds = scnn.estimate((1, 3, 64, 64), time_model=TimeModel())
    assert abs(multiply_adds.relative_time - 4 * estimate.recompute_factor / 3) <= 1e-12


def test_an_in_place_step_allocates_only_its_gradient_and_a_convolution_its_copies() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1)).eval()
    graph = TrunkGraph(trunk)
    costs = layer_costs(graph, 3)
    assert [(c.in_place, c.convolution) for c in costs[1:]] == [(False, True), (True, False), (False, True)]
    scnn = StreamingCNN(trunk, tile_size=32, stages=None, tile_batch=1)
    output_bytes = 8 * 64 * 64 * 4  # each step's output over the whole 64² image

    def whole_fresh(copies: int) -> int:
        model = TimeModel(fresh_memory_cost=10.0, fresh_memory_threshold=output_bytes, convolution_copies=copies)
        return scnn.estimate((1, 3, 64, 64), time_model=model).whole_image_fresh_bytes

    # the forward allocates the two convolutions' outputs (the ReLU writes into the first), the
    # backward a gradient of each of the three outputs
    assert whole_fresh(0) == (2 + 3) * output_bytes
    # a convolution copies its input and output once in the forward and twice in the backward:
    # the second convolution reads the 8-channel map, the first the 3-channel image (not counted)
    assert whole_fresh(1) == (2 + 3) * output_bytes + (2 + 1) * 3 * output_bytes


def test_on_the_cpu_the_whole_images_fresh_memory_makes_1024_px_tiles_cheaper_than_their_multiply_adds() -> None:
    # ResNet-18 at 2048²: every activation of the whole image is past glibc's 32 MiB mmap
    # threshold; a 1024-px tile's are not (measured: 1.0-1.2x the whole-image step, README). The
    # stage memory holds the kept maps (224 MiB) and the output map (16 MiB, both with their
    # gradients) and no more: every stage runs tiles of its budget
    trunk = nn.Sequential(*list(models.resnet18().children())[:-2]).eval()
    scnn = StreamingCNN(trunk, tile_size=1024, stage_memory=240 << 20)
    on_cpu = scnn.estimate((1, 3, 2048, 2048))
    multiply_adds = scnn.estimate((1, 3, 2048, 2048), time_model=TimeModel())
    # the streamed step's fresh memory is its runs' working sets faulted back in after each stage
    assert on_cpu.fresh_bytes < 1.5 * 2**30 < 4 * 2**30 < on_cpu.whole_image_fresh_bytes
    assert on_cpu.relative_time < 1.0 < 1.2 < multiply_adds.relative_time
    assert on_cpu.peak_bytes == multiply_adds.peak_bytes


def test_runs_fault_their_working_set_in_again_after_each_heap_trim() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    scnn = StreamingCNN(trunk, tile_size=32, stages=None, tile_batch=1)  # one tile a run
    shape = (1, 3, 64, 64)
    runs = len(scnn.stage_plans(shape)[0].batches)
    assert runs == 9

    def fresh(run_trim_bytes: int | None, run_mmap_threshold: int = 1 << 40, convolution_copies: int = 0) -> int:
        model = TimeModel(fresh_memory_cost=10.0, fresh_memory_threshold=1 << 40, run_trim_bytes=run_trim_bytes,
                          run_mmap_threshold=run_mmap_threshold, convolution_copies=convolution_copies)
        return scnn.estimate(shape, time_model=model).fresh_bytes

    kept, after_stages, after_runs = fresh(None), fresh(1 << 40), fresh(1)
    # a stage of large runs also maps its outputs past the lower threshold afresh: the 8-channel
    # maps of the 9 tiles, in the forward, its recompute and as gradients (with every output past
    # the time model's own threshold, the stitched map and its gradient count too)
    every_output = scnn.estimate(shape, time_model=TimeModel(fresh_memory_cost=10.0, fresh_memory_threshold=1,
                                                             run_trim_bytes=None)).fresh_bytes
    stitched = 2 * 8 * 64 * 64 * 4
    assert fresh(1, run_mmap_threshold=1) == after_runs + every_output - stitched
    assert fresh(1 << 40, run_mmap_threshold=1) == after_stages  # not a stage of large runs
    # below the time model's own threshold a large run's convolution copies are not fresh (measured)
    assert fresh(1, run_mmap_threshold=1, convolution_copies=1) == fresh(1, run_mmap_threshold=1)
    assert kept == 0  # nothing reaches the threshold, nothing is returned
    # trimmed after the stage: its first forward run and its first backward run fault in once;
    # trimmed after every run: each of the 9 backward runs faults in its working set
    backward_run = (after_runs - after_stages) / (runs - 1)
    forward_run = after_stages - backward_run
    assert 0 < forward_run < backward_run < 4 * 8 * 32 * 32 * 4  # four 8-channel maps of a 32-px tile


def test_only_the_cpu_charges_for_fresh_memory() -> None:
    from lightstream.core.memory import RUN_TRIM_BYTES

    assert TimeModel.for_device(torch.device("cpu")).fresh_memory_cost > 0
    assert TimeModel.for_device(torch.device("cpu")).run_trim_bytes == RUN_TRIM_BYTES
    assert TimeModel.for_device(torch.device("cuda")) == TimeModel.for_device(torch.device("meta")) == TimeModel()
