"""Train a tiny ImageSegmenter with DDP on CPU (gloo, two ranks, float64); each rank saves its weights.

Run as ``python segmenter_ddp_fit.py OUT_DIR``: rank ``r`` saves ``OUT_DIR/rank{r}.pt``.
``test_segmenter.py`` computes the single-process reference from :func:`trunk` and :func:`dataset`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch

from lightstream.models import UNet
from lightstream.modules import ImageSegmenter
from streaming_helpers import quiet_trainer

STEPS, LOCAL_BATCH, WORLD_SIZE, LR, TILE = 2, 2, 2, 0.5, 60


def trunk() -> UNet:
    torch.manual_seed(0)
    return UNet(3, num_classes=3, depth=2, width=3, up="bilinear").double()


def dataset() -> torch.utils.data.TensorDataset:
    """64x88 images with class maps in {0, 1, 2}: every rank's batch has as many pixels, so the
    mean of the ranks' mean losses is the global batch's mean loss."""
    generator = torch.Generator().manual_seed(2)
    count = STEPS * LOCAL_BATCH * WORLD_SIZE
    images = torch.randn(count, 3, 64, 88, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(images, torch.randint(0, 3, (count, 64, 88), generator=generator))


class DistributedSegmenter(ImageSegmenter):
    """SGD; rank r reads samples r, r + 2, ..., so step s covers samples [4s, 4s + 4)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.get_trainable_params(), lr=LR)

    def train_dataloader(self):
        sampler = torch.utils.data.DistributedSampler(dataset(), num_replicas=self.trainer.world_size,
                                                      rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(dataset(), batch_size=LOCAL_BATCH, sampler=sampler)


class SaveWeights(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.stream_network.stream_module.state_dict(), self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes share the CPU
    trainer = quiet_trainer(devices=WORLD_SIZE, strategy="ddp", precision="64-true", max_steps=STEPS,
                            use_distributed_sampler=False, callbacks=[SaveWeights(Path(sys.argv[1]))])
    trainer.fit(DistributedSegmenter(trunk(), TILE, num_classes=3))
    os._exit(0)  # skip gloo's slow teardown; the weights are saved
