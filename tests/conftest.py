"""Shared helpers for the test-suite: whole-image references for streamed results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightstream import StreamingCNN


@pytest.fixture
def gpu_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan as on a GPU while running on the CPU: spare stage memory buys larger runs and batches."""
    monkeypatch.setattr("lightstream.core.engine.spends_spare_memory", lambda device: True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|a - e| / |e|`` in the Frobenius norm (0 when both are zero)."""
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def whole_image_reference(trunk: nn.Module, image: torch.Tensor, grad: torch.Tensor
                          ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
    """Conventional forward/backward on the whole image: output, parameter grads, image grad."""
    trunk.zero_grad(set_to_none=True)
    leaf = image.detach().clone().requires_grad_()
    out = trunk(leaf)
    out.backward(grad)
    grads = [None if p.grad is None else p.grad.detach().clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    return out.detach(), grads, leaf.grad.detach()


def assert_streaming_exact(trunk: nn.Module, image: torch.Tensor, tile_size, tol: float = 1e-10,
                           min_tiles_per_axis: int = 2, **options) -> StreamingCNN:
    """Stream ``trunk`` over ``image`` and compare output, every parameter grad and the image grad."""
    scnn = StreamingCNN(trunk, tile_size=tile_size, saliency=True, **options)
    plan = scnn.plan(image.shape)
    assert min(plan.grid) >= min_tiles_per_axis, f"test does not tile enough: grid {plan.grid}"
    torch.manual_seed(1)
    expected_out = trunk(image).detach()
    grad = torch.randn_like(expected_out)
    expected_out, expected_grads, expected_image_grad = whole_image_reference(trunk, image, grad)
    out = scnn(image)
    assert out.shape == expected_out.shape
    assert relative_error(out, expected_out) <= tol
    scnn.backward(image, grad)
    for (name, param), expected in zip(trunk.named_parameters(), expected_grads):
        assert param.grad is not None, f"no gradient for {name}"
        assert relative_error(param.grad, expected) <= tol, f"gradient of {name} differs"
    assert scnn.saliency_map is not None
    assert relative_error(scnn.saliency_map, expected_image_grad) <= tol
    trunk.zero_grad(set_to_none=True)
    return scnn


def small_trunk() -> nn.Module:
    """Three convolutions and a pooling: receptive field 12 px, output stride 4 (eval mode)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
    ).eval()


@pytest.fixture
def single_torch_thread():
    """Run torch on one thread: for tiny tensors on a shared CPU, an intra-op thread pool
    spin-waits so much that a small convolution takes milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomise_batch_norm(module: nn.Module) -> nn.Module:
    """Eval mode in float64, with BatchNorm statistics far from the identity (so a wrong crop shows)."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2)
    return module.double().eval()
