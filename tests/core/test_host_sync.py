"""A streamed step neither reads a value back from the device nor builds a tensor from host data.

On a GPU either one waits: ``.item()``, ``bool(tensor)`` or ``nonzero`` wait for every queued
kernel, and a tensor built from a Python number is a blocking host-to-device copy. Once a tile,
that serialises the host's kernel launches with the device's work. On the CPU the same calls
dispatch ``_local_scalar_dense`` (a read) and ``lift_fresh`` (a tensor from host data), which
these tests count in a step after the first (the first plans, probes and checks ``mean``/``std``).
``tests/core/test_cuda.py`` checks the same steps on a GPU with CUDA's sync debug mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lightstream import StreamingCNN
from tests.core.dense_networks import TinyUNet, randomise_batch_norm
from tests.core.test_dispatch_plan import _staged_trunk
from tests.core.test_tile_batching import DispatchCounter, LazyImage

WAITING_OPS = ("_local_scalar_dense", "nonzero", "lift_fresh", "masked_select", "equal", "is_nonzero")
MEAN, STD = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)


def _waiting_ops_of_second_step(step: Callable[[], object]) -> dict[str, int]:
    step()
    with DispatchCounter() as ops:
        step()
    assert sum(ops.counts.values()) > 100  # the step ran
    return {name: ops.counts[name] for name in WAITING_OPS if ops.counts[name]}


def _uint8_image() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 256, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("planning", ["cpu", "gpu"])
@pytest.mark.parametrize("from_source", [False, True], ids=["tensor", "lazy-source"])
def test_a_staged_8bit_step_reads_nothing_back_per_tile(planning: str, from_source: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if planning == "gpu":  # batched tiles and larger runs, as planned on a GPU
        monkeypatch.setattr("lightstream.core.engine.spends_spare_memory", lambda device: True)
    trunk = _staged_trunk().float()
    scnn = StreamingCNN(trunk, tile_size=64, mean=MEAN, std=STD)
    image = _uint8_image()
    source = LazyImage(image) if from_source else image
    assert len(scnn.stage_plans(image.shape)) >= 3 and len(scnn.stage_plans(image.shape)[0].plan) >= 9

    def step() -> None:
        scnn.forward_autograd(source).square().mean().backward()

    assert _waiting_ops_of_second_step(step) == {}


def test_the_explicit_forward_and_backward_read_nothing_back_per_tile() -> None:
    scnn = StreamingCNN(_staged_trunk().float(), tile_size=64, mean=MEAN, std=STD, saliency=True)
    image = _uint8_image()

    def step() -> None:
        out = scnn(image)
        scnn.backward(image, torch.ones_like(out))

    assert _waiting_ops_of_second_step(step) == {}


@pytest.mark.parametrize("weighted", [False, True], ids=["pixel-mean", "ignore-index-mean"])
def test_a_streamed_per_pixel_loss_reads_nothing_back_per_tile(weighted: bool) -> None:
    torch.manual_seed(0)
    trunk = randomise_batch_norm(TinyUNet("bilinear")).float()
    image = torch.randn(2, 3, 64, 88)
    target = torch.randint(0, 3, (2, 64, 88))
    scnn = StreamingCNN(trunk, tile_size=(40, 44))
    assert len(scnn.plan(image.shape)) >= 6

    def step() -> None:
        scnn.stream_loss(image, target, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                         ignore_index=2 if weighted else None)

    assert _waiting_ops_of_second_step(step) == {}
