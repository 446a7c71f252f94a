"""Staged streaming (cut at downsampling boundaries) is exact and cuts overlap."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN, TimeModel
from lightstream.core.stages import default_stage_memory
from tests.conftest import assert_streaming_exact, relative_error
from tests.core.test_exactness_torchvision import _prepare


def _resnet18() -> nn.Sequential:
    return _prepare(nn.Sequential(*list(models.resnet18().children())[:-2]))


def test_auto_stages_on_resnet18_are_exact_and_every_stage_tiles() -> None:
    image = torch.randn(2, 3, 352, 320, dtype=torch.float64)
    # stage memory for the kept maps and the output only (float64, batch 2, with gradients): every stage tiles
    maps = 2 * 2 * 8 * (64 * 88 * 80 + 128 * 44 * 40 + 256 * 22 * 20 + 512 * 11 * 10)
    scnn = assert_streaming_exact(_resnet18(), image, tile_size=160, stages="auto", stage_memory=maps)
    plans = scnn.stage_plans(image.shape)
    assert [p.stage.name for p in plans] == ["0..3", "4..5", "6", "7"]
    assert all(len(p.plan) > 1 for p in plans[:2])


def test_explicit_stage_cuts_are_exact_with_tiles_smaller_than_the_trunks_receptive_field() -> None:
    trunk = _resnet18()
    assert StreamingCNN(trunk, tile_size=435, stages=None).geometry.receptive_field == (435, 435)
    image = torch.randn(1, 3, 256, 288, dtype=torch.float64)
    assert_streaming_exact(trunk, image, tile_size=128, stages=[4, 6, 7])


def test_forward_autograd_with_stages_is_exact() -> None:
    trunk = _resnet18()
    image = torch.randn(1, 3, 256, 256, dtype=torch.float64, requires_grad=True)
    trunk(image).square().sum().backward()
    expected = [p.grad.clone() for p in trunk.parameters()] + [image.grad.clone()]
    trunk.zero_grad(set_to_none=True)
    image.grad = None
    scnn = StreamingCNN(trunk, tile_size=96, stages=[4, 5, 6, 7])
    scnn.forward_autograd(image).square().sum().backward()
    for actual, e in zip([p.grad for p in trunk.parameters()] + [image.grad], expected):
        assert relative_error(actual, e) <= 1e-10


def test_backward_without_kept_maps_recomputes_them() -> None:
    trunk = _resnet18()
    image = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    scnn = StreamingCNN(trunk, tile_size=96, stages="auto")
    with torch.no_grad():
        fmap = scnn(image)  # nothing kept under no_grad
    reference = trunk(image)
    reference.sum().backward()
    expected = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    scnn.backward(image, torch.ones_like(fmap))
    for p, e in zip(trunk.parameters(), expected):
        assert relative_error(p.grad, e) <= 1e-10


def test_staging_cuts_recompute_for_small_tiles() -> None:
    trunk = nn.Sequential(*list(models.resnet18().children())[:-2]).eval()
    whole = StreamingCNN(trunk, tile_size=1024, stages=None).estimate((1, 3, 2048, 2048))
    staged = StreamingCNN(trunk, tile_size=1024, stages="auto").estimate((1, 3, 2048, 2048))
    assert staged.recompute_factor < 1.1 < 1.5 < whole.recompute_factor


def test_planning_by_height_and_width_reads_the_channels_from_the_first_convolution() -> None:
    grayscale = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(4), nn.Conv2d(4, 4, 3, padding=1)).eval()
    scnn = StreamingCNN(grayscale, tile_size=16)
    assert [p.stage.name for p in scnn.stage_plans((64, 64))] == ["0..1", "2"]
    assert scnn.plan((64, 64)).grid == (6, 6)


def _resnet34_trunk() -> nn.Sequential:
    return nn.Sequential(*list(models.resnet34(weights=None).children())[:-2]).eval()


def test_a_larger_stage_memory_keeps_more_stage_maps_and_recomputes_less() -> None:
    # The plans of the H200 measurement in the README (ResNet-34, 8192², tile 2048, float32).
    shape = (1, 3, 8192, 8192)
    plans, estimates = {}, {}
    for gib in (1, 4):
        scnn = StreamingCNN(_resnet34_trunk(), tile_size=2048, stage_memory=gib << 30)
        plans[gib] = [p.stage.name for p in scnn.stage_plans(shape)]
        estimates[gib] = scnn.estimate(shape, time_model=TimeModel())  # multiply-adds, as on a GPU
        assert estimates[gib].stage_map_bytes <= gib << 30
    assert plans == {1: ["0..6", "7"], 4: ["0..3", "4..5", "6", "7"]}
    assert estimates[4].relative_time < 1.4 < 1.7 < estimates[1].relative_time


def test_automatic_stage_memory_is_one_and_a_quarter_gib_on_the_cpu_and_a_sixteenth_of_a_large_gpu(monkeypatch
                                                                                                 ) -> None:
    assert StreamingCNN(_resnet34_trunk(), tile_size=2048).stage_memory_bytes == 5 << 28
    assert StreamingCNN(_resnet34_trunk(), tile_size=2048, stage_memory=3 << 30).stage_memory_bytes == 3 << 30
    cards = {"H200": 143771 << 20, "T4": 15360 << 20}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=cards[current]))
    current = "H200"
    assert default_stage_memory(torch.device("cuda")) == (143771 << 20) // 16  # 8.8 GiB
    current = "T4"
    assert default_stage_memory(torch.device("cuda")) == 5 << 28  # never below 1.25 GiB
    with pytest.raises(TypeError, match="stage_memory must be a number of bytes"):
        StreamingCNN(_resnet34_trunk(), tile_size=2048, stage_memory="4 GiB")


@pytest.mark.parametrize("run_trim_bytes", [1, 512 << 20])
def test_a_cpu_step_returns_the_heap_after_each_stage_and_after_each_large_run(monkeypatch, run_trim_bytes) -> None:
    import lightstream.core.execution as execution

    calls: list[None] = []
    mapped: list[int] = []
    monkeypatch.setattr(execution, "release_host_memory", lambda: calls.append(None))
    monkeypatch.setattr(execution, "tensors_mapped_from", lambda threshold: mapped.append(threshold) or nullcontext())
    monkeypatch.setattr(execution, "RUN_TRIM_BYTES", run_trim_bytes)
    trunk = _resnet18().float()
    scnn = StreamingCNN(trunk, tile_size=160, stages=[4, 6, 7])
    image = torch.randn(1, 3, 256, 256)
    fmap = scnn(image)
    assert len(calls) == 4  # after each of the four stages' forward
    calls.clear()
    scnn.backward(image, torch.ones_like(fmap))
    streamed = [p for p in scnn.stage_plans(image.shape) if len(p.plan) > 1]
    assert streamed and all(0 < p.tile_bytes < 64 << 20 for p in streamed)
    # after each stage's backward, and after every backward batch of a stage whose runs hold at
    # least RUN_TRIM_BYTES (by the plan): here every run or none
    batches = sum(len(p.batches) for p in streamed) if run_trim_bytes == 1 else 0
    assert len(calls) == 4 + batches
    # stages of large runs map their larger tensors apart, forward and backward
    assert mapped == ([execution.RUN_MMAP_THRESHOLD] * 2 * len(streamed) if run_trim_bytes == 1 else [])


_MAPPED_WHILE_ALIVE = """
import ctypes, sys, torch
from lightstream.core.memory import tensors_mapped_from

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_while_alive(nbytes):
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before

libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD where a process that freed large tensors has it
before = mapped_while_alive(8 << 20)
with tensors_mapped_from(1 << 20):
    inside = mapped_while_alive(8 << 20)
print(before, inside, mapped_while_alive(8 << 20))
"""


def test_within_tensors_mapped_from_large_tensors_are_mapped_apart_and_afterwards_in_the_heap() -> None:
    # a fresh process: glibc maps a block apart only when no free heap chunk can hold it
    done = subprocess.run([sys.executable, "-c", _MAPPED_WHILE_ALIVE], capture_output=True, text=True, check=True)
    before, inside, after = map(int, done.stdout.split())
    assert before == 0 and inside >= 8 << 20
    assert after == 0  # the threshold is back at glibc's 32 MiB


def test_release_host_memory_gives_freed_heap_pages_back_to_the_system() -> None:
    from lightstream.core.memory import process_rss, release_host_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    chunks = [libc.malloc(64 << 10) for _ in range(400)]  # below the mmap threshold: on the heap
    for chunk in chunks:
        ctypes.memset(chunk, 1, 64 << 10)  # resident
    for chunk in chunks[:-1]:  # the last one keeps the freed ones from being trimmed off the top
        libc.free(chunk)
    before = process_rss()
    release_host_memory()
    assert before - process_rss() >= 20 << 20  # of the 25 MiB freed
    libc.free(chunks[-1])
