"""Slide models by backbone name: the attention-MIL model learns the synthetic lesion task through the
streamed trunk and looks at the lesions; the pooled classifier's heatmap is its class score per cell."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import tifffile
import torch

from lightstream.data import Augmentation, write_synthetic_dataset
from lightstream.data.datamodule import SlideDataModule
from lightstream.models import BACKBONE_NAMES, SlideAttentionMIL, SlideClassifier, build_backbone
from lightstream.modules import SlideOutput

SLIDE_SIZE = 512
LESION_RADIUS = SLIDE_SIZE / 5  # level-0 pixels; 51 px at level 1, where the model reads


def _lesions(path: Path) -> list[dict]:
    with tifffile.TiffFile(path) as tif:
        return json.loads(tif.pages[0].description)["lesions"]


def _trainer(**options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **options)


@pytest.mark.slow
def test_attention_mil_learns_the_lesion_task_and_its_attention_peaks_on_lesions(
        tmp_path: Path, single_torch_thread: None) -> None:
    write_synthetic_dataset(tmp_path, n=20, size=(SLIDE_SIZE, SLIDE_SIZE), seed=0, lesion_radius=LESION_RADIUS,
                            compression="zlib", workers=1)
    data = SlideDataModule(str(tmp_path / "labels.csv"), level=1, val_fraction=0.4, thumbnail_size=256,
                           augmentation=Augmentation(brightness=0, contrast=0, saturation=0, hue=0))
    assert [len(data.splits[split]) for split in ("train", "val")] == [12, 8]
    L.seed_everything(0)
    model = SlideAttentionMIL("small_cnn", tile_size=256, lr=2e-3, embed_dim=64, attention_dim=32)
    trainer = _trainer(max_epochs=8)
    trainer.fit(model, data)
    auc = trainer.callback_metrics["val_auc"].item()
    assert auc >= 0.9, auc

    outputs = _trainer().predict(model, data.val_dataloader())
    dataset = data.dataset("val")
    for index, (output, record) in enumerate(zip(outputs, data.splits["val"], strict=True)):
        if record.label == 0:
            continue
        row, col = np.unravel_index(output.heatmap[0].argmax().item(), output.heatmap.shape[1:])
        box = dataset[index].box  # level-1 pixels; the val slides are not augmented
        stride = output.output_stride[0]
        peak_y, peak_x = 2 * (box.top + (row + 0.5) * stride), 2 * (box.left + (col + 0.5) * stride)
        distance = min(np.hypot(peak_y - lesion["center_y"], peak_x - lesion["center_x"]) - lesion["radius"]
                       for lesion in _lesions(record.path))
        assert distance <= 2 * stride, (record.path.name, distance)  # on a lesion, to a cell or two


def test_the_pooled_classifiers_heatmap_is_the_predicted_class_score_per_cell() -> None:
    model = SlideClassifier("small_cnn", num_classes=3, tile_size=64, pooling="avg")
    image = torch.randint(0, 256, (1, 3, 96, 80), dtype=torch.uint8)
    with torch.no_grad():
        output = model.predict_step(image, 0)
        fmap = model.stream_network.stream_module(model.stream_network.prepare_input(image))
    assert isinstance(output, SlideOutput) and output.heatmap_kind == "class score"
    scores = model.head.score_map(fmap)
    predicted = output.logits.argmax(1).item()
    torch.testing.assert_close(output.heatmap[0], scores[0, predicted], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.mean((2, 3)), output.logits, rtol=1e-5, atol=1e-5)  # avg pooling: the mean


def test_every_backbone_name_builds_a_trunk_with_its_channels_and_unknown_names_are_refused() -> None:
    for name, channels in [("small_cnn", 64), ("resnet18", 512), ("resnet50", 2048), ("mobilenet_v2", 1280),
                           ("convnext_tiny", 768)]:
        backbone = build_backbone(name)
        assert name in BACKBONE_NAMES and backbone.channels == channels
        with torch.no_grad():
            assert backbone.trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1] == channels
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("resnet19")
