"""ImageSegmenter: trains exactly like the whole image, evaluates Dice/IoU tile by tile, learns."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from lightstream import ImageSizeError
from lightstream.data import SegmentationSlideDataset, collate_single, write_synthetic_dataset
from lightstream.models import UNet
from lightstream.modules import ImageSegmenter
import segmenter_ddp_fit
from streaming_helpers import loader, max_difference, quiet_trainer

TILE = 60
IGNORE = 255


class _SGDSegmenter(ImageSegmenter):
    def configure_optimizers(self):
        return torch.optim.SGD(self.get_trainable_params(), lr=self.lr)


def _unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(3, num_classes=3, depth=2, width=3, up="bilinear").double()


def _data(count: int = 4, seed: int = 2) -> torch.utils.data.TensorDataset:
    """Random 64x88 images with random class maps in {0, 1, 2}, a tenth of the pixels ignored."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 64, 88, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (count, 64, 88), generator=generator)
    targets[torch.rand(count, 64, 88, generator=generator) < 0.1] = IGNORE
    return torch.utils.data.TensorDataset(images, targets)


def _whole_image_loss(trunk: torch.nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the whole image's logits, mean over the pixels not ignored."""
    return F.cross_entropy(trunk(image), target, ignore_index=IGNORE)


def test_a_training_step_equals_the_whole_image_step_in_float64() -> None:
    trunk = _unet()
    data = _data()
    model = _SGDSegmenter(copy.deepcopy(trunk), TILE, num_classes=3, ignore_index=IGNORE, lr=0.5)
    assert min(model.stream_network.plan((2, 3, 64, 88)).grid) >= 2
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, loader(data, 2))

    reference = copy.deepcopy(trunk)
    images, targets = data[:2]
    loss = _whole_image_loss(reference, images, targets)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    with torch.no_grad():
        for param, grad in zip(reference.parameters(), grads):
            param -= 0.5 * grad
    assert max_difference(model.stream_network.stream_module, reference) <= 1e-10
    assert abs(trainer.callback_metrics["train_loss"].item() - loss.item()) <= 1e-10


def test_validation_loss_dice_and_iou_equal_the_whole_image_values() -> None:
    trunk = _unet()
    data = _data()
    model = ImageSegmenter(copy.deepcopy(trunk), TILE, num_classes=3, ignore_index=IGNORE)
    metrics = quiet_trainer().validate(model, loader(data, 4), verbose=False)[0]
    assert set(metrics) == {"val_loss", "val_dice", "val_iou"}

    images, targets = data[:4]
    with torch.no_grad():
        logits = trunk(images)
    classes = logits.argmax(1)
    dice = MulticlassF1Score(3, average="macro", multidim_average="global", ignore_index=IGNORE)(classes, targets)
    iou = MulticlassJaccardIndex(3, average="macro", ignore_index=IGNORE)(classes, targets)
    assert abs(metrics["val_loss"] - _whole_image_loss(trunk, images, targets).item()) <= 1e-10
    assert abs(metrics["val_dice"] - dice.item()) <= 1e-6
    assert abs(metrics["val_iou"] - iou.item()) <= 1e-6
    assert 0.2 < dice.item() < 0.5  # random weights: near chance, so a wrong count would show


def test_predict_returns_the_class_map_of_the_whole_image() -> None:
    trunk = _unet()
    data = _data(3)
    model = ImageSegmenter(copy.deepcopy(trunk), TILE, num_classes=3)
    (classes,) = quiet_trainer().predict(model, loader(data, 3))
    with torch.no_grad():
        expected = trunk(data.tensors[0]).argmax(1)
    assert classes.dtype == torch.uint8 and classes.shape == (3, 64, 88)
    assert torch.equal(classes.long(), expected)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_the_whole_image_path_gives_the_streamed_loss_and_gradients() -> None:
    images, targets = _data(2)[:2]
    streamed = ImageSegmenter(_unet(), TILE, num_classes=3, ignore_index=IGNORE)
    whole = copy.deepcopy(streamed)
    whole.disable_streaming_hooks()
    losses = []
    for model in (streamed, whole):
        loss = model.training_step((images, targets), 0)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-10
    for (name, a), b in zip(streamed.named_parameters(), whole.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-10, name


def _disks(count: int, seed: int) -> torch.utils.data.TensorDataset:
    """Noisy 64x64 images with one to three bright disks; the target marks the disks (class 1)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    images, targets = [], []
    for _ in range(count):
        target = torch.zeros(64, 64, dtype=torch.int64)
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cy, cx = torch.randint(8, 56, (2,), generator=generator).tolist()
            radius = float(torch.randint(5, 12, (1,), generator=generator))
            target[(rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2] = 1
        noise = 0.3 * torch.randn(3, 64, 64, generator=generator)
        images.append(noise + target.float())
        targets.append(target)
    return torch.utils.data.TensorDataset(torch.stack(images), torch.stack(targets))


def test_a_short_fit_on_synthetic_disks_raises_validation_dice() -> None:
    L.seed_everything(0, verbose=False)
    model = ImageSegmenter(UNet(3, num_classes=2, depth=2, width=8), TILE, num_classes=2, lr=1e-2)
    train, val = loader(_disks(16, seed=1), 4), loader(_disks(4, seed=2), 4)
    trainer = quiet_trainer(max_epochs=3)
    before = trainer.validate(model, val, verbose=False)[0]["val_dice"]
    trainer.fit(model, train, val)
    after = trainer.callback_metrics["val_dice"].item()
    assert after >= 0.75 and after > before + 0.2, (before, after)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_misuse_is_refused_with_the_fix() -> None:
    images, targets = _data(2)[:2]
    targets = targets.clamp(max=2)
    reduced = ImageSegmenter(_unet(), TILE, num_classes=3, loss_fn=torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="reduction='none'"):
        reduced.training_step((images, targets), 0)
    model = ImageSegmenter(_unet(), TILE, num_classes=3)
    with pytest.raises(ValueError, match="not aligned with the trunk's output"):
        model.validation_step((images, targets[:, :32]), 0)
    with pytest.raises(ValueError, match="integer class indices"):
        model.validation_step((images, targets.double()), 0)
    with pytest.raises(ValueError, match="per-pixel target"):
        model.validation_step(images, 0)
    with pytest.raises(ImageSizeError, match=r"cannot run on a 62x88 image"):
        model.validation_step((images[..., :62, :], targets[:, :62]), 0)  # the tiles would give 60 rows
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ImageSegmenter(_unet(), TILE, num_classes=0)


def test_slides_with_label_masks_validate_like_the_whole_slide_and_train(tmp_path) -> None:
    records = write_synthetic_dataset(tmp_path, 2, size=(192, 256), positive_fraction=1.0, lesions=2,
                                      label_masks=True, compression="zlib", lesion_radius=40.0)
    dataset = SegmentationSlideDataset(records, crop_to_tissue=False)
    slides = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate_single)
    trunk = _unet()
    model = ImageSegmenter(copy.deepcopy(trunk), TILE, num_classes=3, mean=[180.0] * 3, std=[40.0] * 3)
    metrics = quiet_trainer().validate(model, slides, verbose=False)[0]

    losses = []
    for index in range(len(dataset)):
        sample = dataset[index]
        image = model.stream_network.prepare_input(sample.image.read(slice(None), slice(None)))
        target = sample.target.read(slice(None), slice(None))[:, 0].long()
        assert 0 < target.float().mean() < 0.5  # lesions and background
        losses.append(F.cross_entropy(trunk(image), target).item())
        sample.close()
    assert abs(metrics["val_loss"] - sum(losses) / len(losses)) <= 1e-10

    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, slides)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert max_difference(model.stream_network.stream_module, trunk) > 0


class _GradientRecorder(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.gradients = [p.grad.detach().clone() for p in pl_module.stream_network.stream_module.parameters()]


def test_bf16_mixed_streams_the_loss_under_autocast_like_the_whole_image() -> None:
    images, targets = _data(2, seed=3)[:2]
    images, targets = images.float(), targets.clamp(max=2)
    trunk = _unet().float()
    model = _SGDSegmenter(copy.deepcopy(trunk), TILE, num_classes=3)
    recorder = _GradientRecorder()
    data = torch.utils.data.TensorDataset(images, targets)
    quiet_trainer(max_steps=1, precision="bf16-mixed", callbacks=[recorder]).fit(model, loader(data, 2))

    errors = {}
    for autocast in (True, False):
        reference = copy.deepcopy(trunk)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(reference(images), targets)
        loss.backward()
        errors[autocast] = max(((streamed - whole.grad).abs().max() / whole.grad.abs().max()).item()
                               for streamed, whole in zip(recorder.gradients, reference.parameters()))
    # the same as the whole image under the same autocast up to bf16 rounding; far from float32
    assert errors[True] <= 0.02 < errors[False], errors


def test_load_from_checkpoint_restores_the_arguments_given_the_network(tmp_path) -> None:
    model = _SGDSegmenter(_unet(), TILE, num_classes=3, ignore_index=IGNORE, lr=0.5, mean=[0.5] * 3, std=[2.0] * 3)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, loader(_data(2), 2))
    trainer.save_checkpoint(tmp_path / "segmenter.ckpt")
    restored = _SGDSegmenter.load_from_checkpoint(tmp_path / "segmenter.ckpt", stream_network=_unet(seed=5))
    assert (restored.num_classes, restored.ignore_index, restored.lr, restored.tile_size) == (3, IGNORE, 0.5, (TILE, TILE))
    assert max_difference(restored.stream_network.stream_module, model.stream_network.stream_module) == 0
    images = _data(1)[:1][0]
    assert torch.equal(restored(images), model(images))


def test_ddp_ranks_hold_the_weights_of_single_process_training_on_the_global_batch(tmp_path) -> None:
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(here / "segmenter_ddp_fit.py"), str(tmp_path)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(segmenter_ddp_fit.WORLD_SIZE)]

    reference = segmenter_ddp_fit.trunk()
    data = segmenter_ddp_fit.dataset()
    batch = segmenter_ddp_fit.LOCAL_BATCH * segmenter_ddp_fit.WORLD_SIZE
    for step in range(segmenter_ddp_fit.STEPS):
        images, targets = data[step * batch:(step + 1) * batch]
        grads = torch.autograd.grad(F.cross_entropy(reference(images), targets), list(reference.parameters()))
        with torch.no_grad():
            for param, grad in zip(reference.parameters(), grads):
                param -= segmenter_ddp_fit.LR * grad
    for name, expected in reference.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert (ranks[0][name] - expected).abs().max() <= 1e-10, name
