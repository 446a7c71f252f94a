"""Lightning's training features act on the streamed trunk: accumulation, clipping, resume, precision."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from streaming_helpers import (LR, AutogradStyle, ReferenceStyle, image_data, loader, max_difference,
                               quiet_trainer, tiny_head, tiny_trunk, whole_image_sgd)


@pytest.mark.parametrize("style", [AutogradStyle, ReferenceStyle])
def test_accumulated_batches_step_like_one_whole_image_batch(style: type[AutogradStyle]) -> None:
    trunk, head = tiny_trunk(), tiny_head()
    data = image_data(4)
    model = style(copy.deepcopy(trunk), copy.deepcopy(head))
    quiet_trainer(max_steps=2, accumulate_grad_batches=2).fit(model, loader(data, 1))
    # Lightning divides each of the two losses by 2: one step on the mean loss of two images, twice.
    ref_trunk, ref_head = whole_image_sgd(trunk, head, [data[0:2], data[2:4]], LR)
    assert max_difference(model.stream_network.stream_module, ref_trunk) <= 1e-10
    assert max_difference(model.head, ref_head) <= 1e-10
    assert max_difference(ref_trunk, whole_image_sgd(trunk, head, [data[0:1], data[1:2]], LR)[0]) > 1e-3


class _GradientRecorder(L.Callback):
    """Keeps the gradients the optimiser is about to use (after clipping) of the first step."""

    def __init__(self) -> None:
        self.gradients: list[torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.gradients is None:
            self.gradients = [p.grad.clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_covers_the_streamed_trunk(algorithm: str) -> None:
    trunk, head = tiny_trunk(), tiny_head()
    data = image_data(2)
    model = AutogradStyle(copy.deepcopy(trunk), copy.deepcopy(head))
    clip = 0.05
    quiet_trainer(max_steps=1, gradient_clip_val=clip, gradient_clip_algorithm=algorithm).fit(model, loader(data, 2))

    ref_trunk, ref_head = copy.deepcopy(trunk).eval(), copy.deepcopy(head)
    params = [*ref_trunk.parameters(), *ref_head.parameters()]
    image, target = data[:2]
    nn.functional.cross_entropy(ref_head(ref_trunk(image)), target).backward()
    if algorithm == "norm":
        assert torch.nn.utils.clip_grad_norm_(params, clip) > 2 * clip  # clipping is active
    else:
        assert max(p.grad.abs().max() for p in ref_trunk.parameters()) > 2 * clip
        torch.nn.utils.clip_grad_value_(params, clip)
    with torch.no_grad():
        for param in params:
            param -= LR * param.grad
    assert max_difference(model.stream_network.stream_module, ref_trunk) <= 1e-10
    assert max_difference(model.head, ref_head) <= 1e-10


class _AdamStyle(AutogradStyle):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_resuming_from_a_checkpoint_continues_bit_identically(tmp_path) -> None:
    data = loader(image_data(4), 2)
    continuous = _AdamStyle(tiny_trunk(), tiny_head())
    continuous_trainer = quiet_trainer(max_epochs=2)
    continuous_trainer.fit(continuous, data)

    first = _AdamStyle(tiny_trunk(), tiny_head())
    first_trainer = quiet_trainer(max_epochs=1)
    first_trainer.fit(first, data)
    checkpoint = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(checkpoint)

    resumed = _AdamStyle(tiny_trunk(seed=5), tiny_head(seed=6))  # other weights: the checkpoint sets them
    resumed_trainer = quiet_trainer(max_epochs=2)
    resumed_trainer.fit(resumed, data, ckpt_path=checkpoint)

    assert resumed_trainer.global_step == continuous_trainer.global_step == 4
    for key, value in continuous.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert max_difference(first, continuous) > 1e-3
    states = [trainer.optimizers[0].state_dict()["state"] for trainer in (continuous_trainer, resumed_trainer)]
    for index, state in states[0].items():
        for name, value in state.items():
            assert torch.equal(states[1][index][name], value), (index, name)


@pytest.mark.parametrize(("precision", "parameter_dtype", "expected"), [
    ("32-true", torch.float32, torch.float32),
    ("64-true", torch.float64, torch.float64),
    ("16-true", torch.float16, torch.float16),
    ("bf16-true", torch.bfloat16, torch.bfloat16),
    ("16-mixed", torch.float32, torch.float16),
    ("bf16-mixed", torch.float32, torch.bfloat16),
])
def test_streaming_dtype_follows_the_trainer_precision(precision: str, parameter_dtype: torch.dtype,
                                                       expected: torch.dtype) -> None:
    model = AutogradStyle(tiny_trunk(dtype=parameter_dtype), tiny_head(dtype=parameter_dtype))
    # *-true precisions convert the parameters (done above); *-mixed ones autocast. A stand-in
    # trainer, because on CPU Lightning turns 16-mixed into bf16-mixed.
    model.trainer = SimpleNamespace(precision=precision)
    assert model.streaming_dtype == expected


class _AutocastRecorder:
    """Records, for every trunk convolution call, the autocast state and whether grad was on."""

    def __init__(self, trunk: nn.Module) -> None:
        self.calls: list[tuple[bool, bool, torch.dtype, torch.dtype]] = []
        for layer in trunk.modules():
            if isinstance(layer, nn.Conv2d):
                layer.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        self.calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                           torch.get_autocast_dtype("cpu"), output.dtype))


@pytest.mark.usefixtures("gpu_planning")  # batches of equal tiles, as on a GPU
def test_bf16_mixed_streams_under_autocast_and_the_recompute_replays_it() -> None:
    trunk, head = tiny_trunk(dtype=torch.float32), tiny_head(dtype=torch.float32)
    data = image_data(2, dtype=torch.float32)
    # One stage, so every tile is recomputed (a single-tile stage would keep its graph instead).
    model = AutogradStyle(copy.deepcopy(trunk), copy.deepcopy(head), stages=None)
    recorder, gradients = _AutocastRecorder(model.stream_network.stream_module), _GradientRecorder()
    dtypes = []
    model.on_train_batch_start = lambda batch, batch_idx: dtypes.append(model.streaming_dtype)
    quiet_trainer(max_steps=1, precision="bf16-mixed", callbacks=[gradients]).fit(model, loader(data, 2))

    assert dtypes == [torch.bfloat16]
    forward = [call for call in recorder.calls if not call[0]]
    recompute = [call for call in recorder.calls if call[0]]
    (stage,) = model.stream_network.stream_plan(data.tensors[0].shape).stages
    assert len(stage.plan) > len(stage.batches) > 1  # tiles of equal shape run as one batch
    assert len(forward) == 3 * len(stage.forward_batches)  # three convolutions per run, each pass
    assert len(recompute) == 3 * len(stage.batches)
    assert all(call[1:] == (True, torch.bfloat16, torch.bfloat16) for call in recorder.calls)

    relative_errors = {}
    for autocast in (True, False):
        ref_trunk, ref_head = copy.deepcopy(trunk).eval(), copy.deepcopy(head)
        image, target = data[:2]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(ref_head(ref_trunk(image)), target)
        loss.backward()
        relative_errors[autocast] = max(((streamed - whole.grad).abs().max() / whole.grad.abs().max()).item()
                                        for streamed, whole in zip(gradients.gradients, ref_trunk.parameters()))
    # Equal to the whole image under the same autocast up to bf16 rounding; far from float32.
    assert relative_errors[True] <= 0.01 < 0.02 <= relative_errors[False]


def test_bf16_true_trains_bf16_parameters_like_the_whole_image() -> None:
    trunk, head = tiny_trunk(dtype=torch.float32), tiny_head(dtype=torch.float32)
    data = image_data(2, dtype=torch.float32)
    model = AutogradStyle(copy.deepcopy(trunk), copy.deepcopy(head))
    quiet_trainer(max_steps=1, precision="bf16-true").fit(model, loader(data, 2))
    assert model.streaming_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())

    image, target = data[:2]
    ref_trunk, ref_head = whole_image_sgd(trunk.bfloat16(), head.bfloat16(), [(image.bfloat16(), target)], LR)
    # one bf16 rounding step apart at most, while the SGD step moved the weights by much more
    assert max_difference(model.stream_network.stream_module, ref_trunk) <= 4e-3
    assert max_difference(model.head, ref_head) <= 4e-3
    assert max_difference(ref_trunk, trunk) > 0.05
