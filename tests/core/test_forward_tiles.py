"""The forward without a graph runs its own, larger tiles; tile shapes are chosen for the fewest runs
(a GPU) or the least overlap (the CPU); every run stays within its memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN
from lightstream.core.stages import forward_values, tile_values
from tests.conftest import assert_streaming_exact
from tests.core.test_dispatch_plan import _staged_trunk
from tests.core.test_tile_batching import DispatchCounter, _awkward


@pytest.mark.parametrize("stages", [None, "auto"])
def test_the_forward_runs_fewer_larger_tiles_and_every_gradient_stays_exact(stages) -> None:
    image = torch.randn(2, 3, 280, 330, dtype=torch.float64)
    scnn = assert_streaming_exact(_awkward(), image, (100, 110), stages=stages, stage_memory=1 << 22)
    first = scnn.stage_plans(image.shape)[0]
    assert first.forward_plan is not None and len(first.forward_plan) < len(first.plan)
    assert first.forward_plan.tile_size[0] > 100 or first.forward_plan.tile_size[1] > 110


@pytest.mark.usefixtures("gpu_planning")
def test_a_staged_trunk_planned_as_on_a_gpu_is_exact_with_forward_tiles_bands_and_kept_graphs() -> None:
    image = torch.randn(2, 3, 384, 320, dtype=torch.float64)
    scnn = assert_streaming_exact(_staged_trunk(), image, 64, stage_memory=1 << 19)
    plans = scnn.stage_plans(image.shape)
    assert any(p.forward_plan is not None for p in plans)
    assert any(p.tile_size[0] != p.tile_size[1] for p in plans[1:] if len(p.plan) > 1)  # a band


def test_the_forward_dispatches_its_own_runs_once_and_the_backward_the_plans_runs() -> None:
    trunk = _awkward()
    image = torch.randn(1, 3, 280, 330, dtype=torch.float64)
    scnn = StreamingCNN(trunk, tile_size=(100, 110), stages=None)
    (stage,) = scnn.stage_plans(image.shape)
    assert stage.forward_plan is not None and stage.batches  # planned outside the count
    with DispatchCounter() as counter:
        out = scnn(image)
        scnn.backward(image, torch.ones_like(out))
    convolutions = 6  # of the awkward trunk, per run
    assert counter.counts["convolution"] == convolutions * (len(stage.forward_batches) + len(stage.batches))
    assert len(stage.forward_batches) < len(stage.batches)


def test_a_hand_set_tile_batch_runs_the_forward_on_the_users_tiles() -> None:
    scnn = StreamingCNN(_awkward(), tile_size=(100, 110), stages=None, tile_batch=1)
    (stage,) = scnn.stage_plans((1, 3, 280, 330))
    assert stage.forward_plan is None and stage.forward_batches == stage.batches


def test_on_the_cpu_no_run_holds_more_than_one_tile_of_the_users_size() -> None:
    for memory in (1 << 18, 1 << 22, 1 << 26):
        scnn = StreamingCNN(_staged_trunk(), tile_size=64, stage_memory=memory)
        shape = (1, 3, 256, 256)
        planner = scnn.planner
        whole = planner.stages(())[0]
        budget = tile_values(whole, planner.costs([whole], 3)[0], (64, 64))
        plans = scnn.stage_plans(shape)
        costs = planner.costs([p.stage for p in plans], 3)
        for index, (plan, cost) in enumerate(zip(plans, costs)):
            if index > 0 and len(plan.plan) > 1:
                assert tile_values(plan.stage, cost, plan.tile_size) * plan.tile_batch <= budget * (1 + 1e-9)
            if plan.forward_plan is not None:
                values = forward_values(plan.stage, cost, plan.forward_plan.tile_size)
                assert values * plan.forward_tile_batch <= max(budget, tile_values(plan.stage, cost, plan.tile_size))


def _resnet34_on_meta() -> nn.Sequential:
    return nn.Sequential(*list(models.resnet34().children())[:-2]).eval().to("meta")


@pytest.mark.slow
def test_a_gpu_plan_for_resnet34_at_4096_px_runs_the_smaller_stages_in_full_width_bands() -> None:
    scnn = StreamingCNN(_resnet34_on_meta(), tile_size=1024)  # meta plans as a GPU with 1.25 GiB does
    plans = {p.stage.name: p for p in scnn.stage_plans((1, 3, 4096, 4096))}
    layer3 = plans["6"]
    assert len(layer3.plan) == 2 and 512 in layer3.tile_size  # a square that fits would need 2 x 2
    assert layer3.forward_plan is not None and len(layer3.forward_plan) == 1


@pytest.mark.slow
@pytest.mark.parametrize("size, tile", [(2048, 512), (4096, 1024)])
def test_a_resnet34_step_dispatches_at_most_five_times_the_whole_images_operations(size: int, tile: int) -> None:
    trunk = _resnet34_on_meta()
    scnn = StreamingCNN(trunk, tile_size=tile)
    image = torch.empty(1, 3, size, size, device="meta")
    assert all(p.forward_batches and p.batches for p in scnn.stage_plans(image.shape))  # planned outside
    totals = {}
    for mode, run in (("whole", trunk), ("streamed", scnn.forward_autograd)):
        with DispatchCounter() as counter:
            run(image).amax(dim=(2, 3)).sum().backward()
        totals[mode] = sum(counter.counts.values())
    assert totals["streamed"] <= 5 * totals["whole"], totals
