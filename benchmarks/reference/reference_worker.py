"""One training step of the reference library (DIAGNijmegen's lightstream 1.0.7), measured in its own process.

Run by ``benchmarks/compare_reference.py`` with ``.venv-reference/bin/python`` (made by
``setup.sh`` beside this file), never imported: there ``lightstream`` is the reference package,
whose hooks rewrite the trunk's convolutions. Argument: the configuration as JSON (see
``step_fixture.run_worker``).

The step is the one its users run (``ImageNetClassifier.training_step``): ``fmap =
scnn(image)`` streams the forward without a graph, the head's loss is backpropagated to the
feature map, then ``scnn.backward(image, fmap.grad)`` streams the backward. The streaming
network is the library's ``StreamingCNN`` as ``StreamingModule``/``StreamingConstructor``
builds it (tile ``(1, 3, tile, tile)``, normalisation of 8-bit tiles on the device), but
constructed directly: the constructor moves the trunk to CUDA unconditionally, which a CPU-only
machine cannot run. With bf16 the streaming dtype is set as its Lightning module does for
``bf16-mixed`` precision, and the step runs under autocast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: step_fixture (no lightstream there)
from lightstream.core.scnn.scnn import StreamingCNN  # noqa: E402  (the reference library)
from step_fixture import DTYPES, MEAN, STD, run_worker  # noqa: E402


def make_step(trunk: nn.Sequential, head: nn.Module, image: torch.Tensor, config: dict):
    device, amp = config["device"], DTYPES[config["dtype"]]
    scnn = StreamingCNN(
        trunk, tile_shape=(1, 3, config["tile"], config["tile"]), copy_to_gpu=False, statistics_on_cpu=False,
        normalize_on_gpu=True, mean=[m / 255 for m in MEAN], std=[s / 255 for s in STD])
    scnn.mean, scnn.std = scnn.mean.to(device), scnn.std.to(device)  # what its Lightning hooks do
    if amp is not None:
        scnn.dtype = amp
    target = torch.zeros(image.shape[0], dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            fmap = scnn(image)
            fmap.requires_grad = True
            loss = nn.functional.cross_entropy(head(fmap.float()), target)
        loss.backward()
        scnn.backward(image, fmap.grad)
        return fmap

    return step


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]), make_step)
