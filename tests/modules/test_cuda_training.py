"""Lightning on a GPU: a streamed step equals the whole-image step, and mixed precision keeps its dtype."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn

from streaming_helpers import (LR, AutogradStyle, image_data, loader, max_difference, quiet_trainer,
                               tiny_head, tiny_trunk, whole_image_sgd)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_float64_gpu_training_run_equals_whole_image_sgd() -> None:
    trunk, head = tiny_trunk(), tiny_head()
    data = image_data(4)  # on the CPU: Lightning moves each batch to the GPU
    model = AutogradStyle(copy.deepcopy(trunk), copy.deepcopy(head))
    devices = []
    model.on_train_batch_start = lambda batch, batch_idx: devices.append(
        (batch[0].device.type, next(model.parameters()).device.type))
    quiet_trainer(max_steps=2, accelerator="gpu", precision="64-true").fit(model, loader(data, 2))
    assert devices == [("cuda", "cuda")] * 2  # (Lightning moves the model back to the CPU after fit)
    ref_trunk, ref_head = whole_image_sgd(trunk, head, [data[0:2], data[2:4]], LR)
    assert max_difference(model.stream_network.stream_module.cpu(), ref_trunk) <= 1e-10
    assert max_difference(model.head.cpu(), ref_head) <= 1e-10


class _FirstGradients(L.Callback):
    """The streaming dtype of the first batch and the (unscaled) gradients of the first step."""

    def __init__(self) -> None:
        self.dtype: torch.dtype | None = None
        self.gradients: list[torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.dtype = self.dtype or pl_module.streaming_dtype

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.gradients is None:
            self.gradients = [p.grad.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize(("precision", "dtype"), [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_mixed_precision_on_the_gpu_streams_in_its_own_dtype_like_whole_image_autocast(
        precision: str, dtype: torch.dtype) -> None:
    trunk, head = tiny_trunk(dtype=torch.float32), tiny_head(dtype=torch.float32)
    data = image_data(2, dtype=torch.float32)
    model = AutogradStyle(copy.deepcopy(trunk), copy.deepcopy(head), stages=None)  # every tile recomputed
    recorder = _FirstGradients()
    quiet_trainer(max_steps=1, accelerator="gpu", precision=precision, callbacks=[recorder]).fit(
        model, loader(data, 2))
    assert recorder.dtype == dtype  # bf16 stays bf16 (not mapped to fp16), fp16 stays fp16

    ref_trunk, ref_head = copy.deepcopy(trunk).cuda().eval(), copy.deepcopy(head).cuda()
    image, target = (t.cuda() for t in data[:2])
    with torch.autocast("cuda", dtype=dtype):
        loss = nn.functional.cross_entropy(ref_head(ref_trunk(image)), target)
    loss.backward()
    whole = [*ref_trunk.parameters(), *ref_head.parameters()]
    errors = [((s - w.grad).abs().max() / w.grad.abs().max()).item() for s, w in zip(recorder.gradients, whole)]
    assert max(errors) <= 0.02
