"""Mixed precision replays the forward's autocast; lazy sources stream like tensors."""

from __future__ import annotations

import torch
from torch import nn

from lightstream import StreamingCNN
from lightstream.core.source import TensorSource
from tests.conftest import relative_error


def _trunk() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()


def test_bf16_autocast_recompute_runs_in_bf16_like_the_forward() -> None:
    trunk = _trunk()
    seen: list[torch.dtype] = []
    trunk[2].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    scnn = StreamingCNN(trunk, tile_size=24)
    image = torch.randn(2, 3, 64, 56)
    scnn.plan(image.shape)  # planning probes shapes (hooks see it): not part of what is measured
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fmap = scnn(image)
        reference = trunk(image)
    assert fmap.dtype == torch.bfloat16 == reference.dtype
    assert relative_error(fmap.float(), reference.float()) < 2e-2
    forward_dtypes = set(seen)
    seen.clear()
    scnn.backward(image, torch.ones_like(fmap))  # outside autocast, like a GradScaler step
    assert forward_dtypes == set(seen) == {torch.bfloat16}
    assert all(p.grad.dtype == torch.float32 for p in trunk.parameters())


def test_bf16_gradients_match_whole_image_autocast_gradients() -> None:
    trunk = _trunk()
    image = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trunk(image)
    out.float().sum().backward()
    expected = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    scnn = StreamingCNN(trunk, tile_size=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fmap = scnn(image)
    scnn.backward(image, torch.ones_like(fmap))
    for param, e in zip(trunk.parameters(), expected):
        assert relative_error(param.grad, e) < 3e-2


class CountingSource:
    """A lazy source that serves uint8 pixels and counts reads (stands in for a slide)."""

    def __init__(self, image: torch.Tensor) -> None:
        self.inner, self.reads = TensorSource(image), 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.inner.shape

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        self.reads += 1
        return self.inner.read(rows, cols).clone()


def test_lazy_uint8_source_with_normalisation_streams_exactly_like_the_tensor() -> None:
    trunk = _trunk().double()
    pixels = torch.randint(0, 256, (1, 3, 70, 61), dtype=torch.uint8)
    mean, std = [120.0, 110.0, 100.0], [50.0, 60.0, 70.0]
    scnn = StreamingCNN(trunk, tile_size=26, mean=mean, std=std, saliency=True)
    source = CountingSource(pixels)
    fmap = scnn(source)
    (stage,) = scnn.stage_plans(pixels.shape)
    assert stage.forward_plan is not None and len(stage.forward_plan) < len(stage.plan)  # an image in memory's
    assert source.reads == len(stage.plan)  # a lazy source is read in the user's tiles
    normalised = (pixels.double() - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    reference = trunk(normalised)
    assert relative_error(fmap, reference.detach()) <= 1e-12
    grad = torch.randn_like(fmap)
    scnn.backward(source, grad)
    lazy_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    scnn(pixels)
    scnn.backward(pixels, grad)
    for lazy, eager in zip(lazy_grads, trunk.parameters()):
        assert torch.equal(lazy, eager.grad)
    assert scnn.saliency_map.shape == pixels.shape
