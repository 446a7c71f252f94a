"""Streaming a trunk over a lazy slide gives exactly what streaming the same pixels from memory gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightstream.core.source import ImageSource
from lightstream.data import Augmentation, SlideDataset, SlideRecord, SyntheticSlide, open_slide, pad_to_multiple, tissue_box

try:
    from lightstream import StreamingCNN
except ImportError:  # the engine is developed alongside; these tests run once it is importable
    pytest.skip("lightstream.StreamingCNN is not available yet", allow_module_level=True)


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
    )
    return trunk.double().eval()


def _forward_and_gradients(
    scnn: StreamingCNN, image: torch.Tensor | ImageSource, fmap_grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    scnn.stream_module.zero_grad()
    fmap = scnn(image)
    if fmap_grad is None:
        fmap_grad = torch.randn(fmap.shape, dtype=fmap.dtype, generator=torch.Generator().manual_seed(1))
    scnn.backward(image, fmap_grad)
    return fmap, fmap_grad, [p.grad.clone() for p in scnn.stream_module.parameters()]


def test_streaming_a_lazy_slide_equals_streaming_its_pixels_loaded_in_memory(lesion_slide: SyntheticSlide) -> None:
    scnn = StreamingCNN(_trunk(), tile_size=64)
    with open_slide(lesion_slide.path, level=3) as slide:
        box = tissue_box(slide)
        assert box is not None
        lazy = pad_to_multiple(slide.crop(box), scnn.output_stride[0])
        loaded = lazy.read(slice(None), slice(None))  # the same uint8 pixels, as one tensor
        assert loaded.dtype == torch.uint8 and len(scnn.plan(loaded.shape)) > 4  # really tiled

        fmap_lazy, fmap_grad, grads_lazy = _forward_and_gradients(scnn, lazy)
        fmap_loaded, _, grads_loaded = _forward_and_gradients(scnn, loaded, fmap_grad)

    assert torch.equal(fmap_lazy, fmap_loaded)
    assert all(torch.equal(a, b) for a, b in zip(grads_lazy, grads_loaded, strict=True))


def test_streaming_a_slide_matches_the_unstreamed_trunk_on_the_whole_level(lesion_slide: SyntheticSlide) -> None:
    trunk = _trunk()
    scnn = StreamingCNN(trunk, tile_size=64)
    with open_slide(lesion_slide.path, level=3) as slide:
        fmap, fmap_grad, grads = _forward_and_gradients(scnn, slide)
        image = slide.read(slice(None), slice(None)).double()
    trunk.zero_grad()
    expected = trunk(image)
    expected.backward(fmap_grad)
    torch.testing.assert_close(fmap, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, param in zip(grads, trunk.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-10)


def test_an_augmented_dataset_sample_streams_like_its_pixels_in_memory(
    lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide
) -> None:
    scnn = StreamingCNN(_trunk(), tile_size=64)
    dataset = SlideDataset(
        [SlideRecord(lesion_slide.path, 1), SlideRecord(plain_slide.path, 0)],
        mpp=4.0,
        stride=scnn.output_stride[0],
        augmentation=Augmentation(),
        seed=3,
    )
    sample = dataset[1]
    with sample.slide:
        assert sample.image.shape[2] % scnn.output_stride[0] == 0
        fmap_lazy, fmap_grad, grads_lazy = _forward_and_gradients(scnn, sample.image)
        loaded = sample.image.read(slice(None), slice(None))
        fmap_loaded, _, grads_loaded = _forward_and_gradients(scnn, loaded, fmap_grad)
    assert torch.equal(fmap_lazy, fmap_loaded)
    assert all(torch.equal(a, b) for a, b in zip(grads_lazy, grads_loaded, strict=True))
