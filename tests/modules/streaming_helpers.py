"""Tiny float64 models, data and a whole-image reference for the Lightning-layer tests."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import lightning as L
import torch
from torch import nn

from lightstream.modules import StreamingModule

TILE = 16
"""Tile size of the tiny trunk (receptive field 15 px): 36x28 images stream as 6x4 tiles."""
LR = 0.5


def tiny_trunk(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv, BatchNorm (random running statistics), strided conv, max pooling, conv."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, 3, padding=1))
    with torch.no_grad():
        trunk[1].running_mean.uniform_(-1, 1)
        trunk[1].running_var.uniform_(0.5, 2)
        trunk[1].weight.uniform_(0.5, 1.5)
        trunk[1].bias.uniform_(-0.5, 0.5)
    return trunk.to(dtype)


def tiny_head(seed: int = 1, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Global average pooling and a linear layer: 5 channels to 3 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).to(dtype)


def image_data(count: int, height: int = 36, width: int = 28, seed: int = 2,
               dtype: torch.dtype = torch.float64) -> torch.utils.data.TensorDataset:
    """``count`` random images with random targets in ``{0, 1, 2}``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, height, width, generator=generator).to(dtype)
    targets = torch.randint(0, 3, (count,), generator=generator)
    return torch.utils.data.TensorDataset(images, targets)


def loader(data: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary (overridable)."""
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


def whole_image_sgd(trunk: nn.Module, head: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    lr: float) -> tuple[nn.Module, nn.Module]:
    """Copies of ``trunk`` and ``head`` after plain SGD steps on whole images (trunk BN in eval)."""
    trunk, head = copy.deepcopy(trunk).eval(), copy.deepcopy(head)
    params = [*trunk.parameters(), *head.parameters()]
    for image, target in batches:
        loss = nn.functional.cross_entropy(head(trunk(image)), target)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param -= lr * grad
    return trunk, head


def max_difference(first: nn.Module, second: nn.Module) -> float:
    """Largest absolute difference between the two modules' parameters and buffers."""
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys()
    return max((one[k].double() - two[k].double()).abs().max().item() for k in one)


class AutogradStyle(StreamingModule):
    """The common case: a training_step with forward_streaming, no custom backward; SGD(LR)."""

    def __init__(self, trunk: nn.Module, head: nn.Module, tile_size: int = TILE, **kwargs) -> None:
        super().__init__(trunk, tile_size, **kwargs)
        self.head = head
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        image, target = batch
        return self.loss_fn(self.head(self.forward_streaming(image)), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class ReferenceStyle(AutogradStyle):
    """Written as the reference page implies: training_step and backward both implemented."""

    def training_step(self, batch, batch_idx):
        image, target = batch
        self.image = image
        self.str_output = self.forward_streaming(image)
        self.str_output.requires_grad = self.training
        return self.loss_fn(self.head(self.str_output), target)

    def backward(self, loss):
        loss.backward()
        self.backward_streaming(self.image, self.str_output.grad)
