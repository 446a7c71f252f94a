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

from lightstream.modules import StreamingModule
from streaming_helpers import AutogradStyle, ReferenceStyle, image_data, quiet_trainer, tiny_head, tiny_trunk

STEPS = 2
LOCAL_BATCH = 2
WORLD_SIZE = 2


class DistributedData:
    """Lightning's automatic DistributedSampler shuffles training data; this one does not:
    rank r reads samples r, r + 2, ..., so step s covers samples [4s, 4s + 4) of the dataset."""

    def train_dataloader(self):
        sampler = torch.utils.data.DistributedSampler(dataset(), num_replicas=self.trainer.world_size,
                                                      rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(dataset(), batch_size=LOCAL_BATCH, sampler=sampler)


class DistributedAutograd(DistributedData, AutogradStyle):
    pass


class DistributedReference(DistributedData, ReferenceStyle):
    pass


STYLES = {"autograd": DistributedAutograd, "manual": DistributedReference}


def build_model(style: str) -> StreamingModule:
    return STYLES[style](tiny_trunk(), tiny_head())


def dataset() -> torch.utils.data.TensorDataset:
    return image_data(STEPS * LOCAL_BATCH * WORLD_SIZE)


class SaveWeights(L.Callback):
    def __init__(self, out: Path, style: str) -> None:
        self.out, self.style = out, style

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.out / f"{self.style}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes share the CPU (see conftest.py)
    for style in STYLES:
        trainer = quiet_trainer(devices=WORLD_SIZE, strategy="ddp", precision="64-true", max_steps=STEPS,
                                use_distributed_sampler=False, callbacks=[SaveWeights(Path(sys.argv[1]), style)])
        trainer.fit(build_model(style))
    # Skip the interpreter's teardown, where shutting down gloo takes seconds; the weights are saved.
    os._exit(0)
