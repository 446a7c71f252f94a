"""Streaming a trunk over a lazy slide gives exactly what streaming the same pixels from memory gives."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightstream.core.source import ImageSource
from lightstream.data import (Augmentation, SlideDataset, SlideRecord, SyntheticSlide, collate_single, open_slide,
                              pad_to_multiple, tissue_box)
from lightstream.modules import ImageClassifier

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



def test_an_image_classifier_trains_and_predicts_on_what_collate_single_yields(
    lesion_slide: SyntheticSlide, plain_slide: SyntheticSlide, tmp_path
) -> None:
    dataset = SlideDataset([SlideRecord(lesion_slide.path, 1), SlideRecord(plain_slide.path, 0)], mpp=4.0, stride=4)
    trainer_options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, default_root_dir=tmp_path)

    def trained(collate) -> ImageClassifier:
        torch.manual_seed(2)
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
        model = ImageClassifier(_trunk(), head, tile_size=64, lr=0.05)
        L.Trainer(max_steps=2, **trainer_options).fit(model, DataLoader(dataset, batch_size=1, collate_fn=collate))
        return model

    untrained = ImageClassifier(_trunk(), nn.Linear(1, 1), tile_size=64)
    model = trained(collate_single)
    reference = trained(lambda batch: (batch[0].image, batch[0].label[None]))  # an explicit (image, target)
    for (name, got), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, expected), name
    first_conv = model.stream_network.stream_module[0].weight
    assert (first_conv - untrained.stream_network.stream_module[0].weight).abs().max() > 1e-3  # it trained
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_single)
    predictions = L.Trainer(**trainer_options).predict(model, loader)
    assert [tuple(p.shape) for p in predictions] == [(1, 2), (1, 2)]
