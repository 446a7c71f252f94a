"""Train the tiny streamed model with DDP on CPU (gloo); each rank saves its final weights.

Run as ``python ddp_fit.py OUT_DIR``: it trains each style of :data:`STYLES` in turn, and rank
``r`` saves ``OUT_DIR/{style}_rank{r}.pt``. ``test_ddp.py`` computes the single-process reference
from :func:`build_model` and :func:`dataset`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightstream.modules import StreamingModule
from streaming_helpers import TILE, image_data, quiet_trainer, tiny_head, tiny_trunk

STEPS = 2
LOCAL_BATCH = 2
WORLD_SIZE = 2
LR = 0.5


class AutogradStyle(StreamingModule):
    """The common case: no custom backward."""

    def __init__(self) -> None:
        super().__init__(tiny_trunk(), tile_size=TILE)
        self.head = tiny_head()

    def training_step(self, batch, batch_idx):
        image, target = batch
        return nn.functional.cross_entropy(self.head(self.forward_streaming(image)), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        # Lightning's automatic DistributedSampler shuffles training data; this one does not:
        # rank r reads samples r, r + 2, ..., so step s covers samples [4s, 4s + 4).
        sampler = torch.utils.data.DistributedSampler(dataset(), num_replicas=self.trainer.world_size,
                                                      rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(dataset(), batch_size=LOCAL_BATCH, sampler=sampler)


class ManualStyle(AutogradStyle):
    """The reference's manual style: backward overridden, backward_streaming called."""

    def training_step(self, batch, batch_idx):
        self.image, target = batch
        self.fmap = self.forward_streaming(self.image)
        self.fmap.requires_grad = self.training
        return nn.functional.cross_entropy(self.head(self.fmap), target)

    def backward(self, loss):
        loss.backward()
        self.backward_streaming(self.image, self.fmap.grad)


STYLES = {"autograd": AutogradStyle, "manual": ManualStyle}


def build_model(style: str) -> StreamingModule:
    return STYLES[style]()


def dataset() -> torch.utils.data.TensorDataset:
    return image_data(STEPS * LOCAL_BATCH * WORLD_SIZE)


class SaveWeights(L.Callback):
    def __init__(self, out: Path, style: str) -> None:
        self.out, self.style = out, style

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.out / f"{self.style}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for style in STYLES:
        trainer = quiet_trainer(devices=WORLD_SIZE, strategy="ddp", precision="64-true", max_steps=STEPS,
                                use_distributed_sampler=False, callbacks=[SaveWeights(Path(sys.argv[1]), style)])
        trainer.fit(build_model(style))
    # Skip the interpreter's teardown, where shutting down gloo takes seconds; the weights are saved.
    os._exit(0)
