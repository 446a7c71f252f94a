"""The GPU paths: tiles moved to CUDA stream exactly, and mixed precision matches autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from lightstream import StreamingCNN
from tests.conftest import relative_error
from tests.core.dense_networks import TinyUNet, randomise_batch_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _resnet18_trunk(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    trunk = nn.Sequential(*list(models.resnet18(weights=None).children())[:-2]).eval()
    return trunk.to("cuda", dtype)


def test_float64_streaming_on_cuda_from_a_cpu_image_equals_the_whole_image_on_cuda() -> None:
    trunk = _resnet18_trunk(torch.float64)
    image = torch.randn(2, 3, 512, 448, dtype=torch.float64)  # stays on the CPU; tiles are moved
    whole = image.cuda().requires_grad_()
    expected = trunk(whole)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    expected_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    leaf = image.clone().requires_grad_()
    scnn = StreamingCNN(trunk, tile_size=256)
    out = scnn.forward_autograd(leaf)
    assert out.device.type == "cuda" and relative_error(out, expected) <= 1e-10
    out.backward(grad)
    for param, e in zip(trunk.parameters(), expected_grads):
        assert relative_error(param.grad, e) <= 1e-10
    assert leaf.grad.device.type == "cpu" and relative_error(leaf.grad, whole.grad.cpu()) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_streaming_on_cuda_matches_whole_image_autocast(dtype: torch.dtype) -> None:
    trunk = _resnet18_trunk(torch.float32)
    image = torch.randn(1, 3, 512, 512, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        expected = trunk(image)
    expected.float().square().mean().backward()
    expected_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    scnn = StreamingCNN(trunk, tile_size=256)
    with torch.autocast("cuda", dtype=dtype):
        out = scnn.forward_autograd(image)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert relative_error(out.float(), expected.float()) < 2e-2
    for param, e in zip(trunk.parameters(), expected_grads):
        assert param.grad.dtype == torch.float32 and relative_error(param.grad, e) < 5e-2


def test_an_8bit_cpu_image_normalised_per_tile_on_cuda_equals_the_normalised_whole_image() -> None:
    trunk = _resnet18_trunk(torch.float64)
    image = torch.randint(0, 256, (1, 3, 480, 512), dtype=torch.uint8)
    mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
    scale = torch.tensor(std, dtype=torch.float64, device="cuda").view(1, -1, 1, 1)
    shift = torch.tensor(mean, dtype=torch.float64, device="cuda").view(1, -1, 1, 1)
    expected = trunk((image.cuda().double() - shift) / scale)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    expected_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    out = StreamingCNN(trunk, tile_size=256, mean=mean, std=std).forward_autograd(image)
    assert relative_error(out, expected) <= 1e-10
    out.backward(grad)
    for param, e in zip(trunk.parameters(), expected_grads):
        assert relative_error(param.grad, e) <= 1e-10


def test_a_second_streamed_step_on_cuda_never_waits_for_the_device() -> None:
    """CUDA's sync debug mode raises at any synchronising call (``tests/core/test_host_sync.py``
    counts the same calls on the CPU)."""
    scnn = StreamingCNN(_resnet18_trunk(torch.float32), tile_size=256, mean=(120.0, 110.0, 100.0),
                        std=(60.0, 55.0, 50.0))
    image = torch.randint(0, 256, (2, 3, 512, 448), dtype=torch.uint8, device="cuda")
    torch.manual_seed(0)
    unet = StreamingCNN(randomise_batch_norm(TinyUNet("bilinear")).cuda(), tile_size=(40, 44))
    pixels = torch.randn(2, 3, 128, 176, device="cuda")
    target = torch.randint(0, 3, (2, 128, 176), device="cuda")

    def step() -> None:
        scnn.forward_autograd(image).square().mean().backward()
        for ignore_index in (None, 2):
            unet.stream_loss(pixels, target, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                             ignore_index=ignore_index)

    step()  # plans, probes and checks mean/std once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
