"""StreamingModule: both backward styles train exactly like the whole image; its configuration API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightstream import StreamingError, TileTooSmallError
from lightstream.modules import StreamingModule
from streaming_helpers import (LR, TILE, AutogradStyle, ReferenceStyle, image_data, loader, max_difference,
                               quiet_trainer, tiny_head, tiny_trunk, whole_image_sgd)

class ManualOptimisation(AutogradStyle):
    """Manual optimisation with the paper's API: forward under no_grad, backward_streaming."""

    def __init__(self, trunk: nn.Module, head: nn.Module, tile_size: int, **options) -> None:
        super().__init__(trunk, head, tile_size, **options)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        image, target = batch
        with torch.no_grad():
            fmap = self.forward_streaming(image)
        fmap.requires_grad_()
        loss = nn.functional.cross_entropy(self.head(fmap), target)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.backward_streaming(image, fmap.grad)
        optimizer.step()


def _fit_one_step_and_compare(cls: type[StreamingModule], **options) -> None:
    trunk, head = tiny_trunk(), tiny_head()
    data = image_data(2)
    model = cls(copy.deepcopy(trunk), copy.deepcopy(head), TILE, **options)
    plan = model.stream_network.plan(data.tensors[0].shape)
    assert len(plan.row_spans) > 1 and len(plan.col_spans) > 1
    quiet_trainer(max_steps=1).fit(model, loader(data, 2))
    ref_trunk, ref_head = whole_image_sgd(trunk, head, [data[:2]], LR)
    assert max_difference(model.stream_network.stream_module, ref_trunk) <= 1e-10
    assert max_difference(model.head, ref_head) <= 1e-10
    assert max_difference(ref_trunk, trunk) > 1e-2  # the step moved the weights (and BN affine)
    assert torch.equal(model.stream_network.stream_module[1].running_mean, trunk[1].running_mean)


def test_reference_style_subclass_trains_like_the_whole_image() -> None:
    _fit_one_step_and_compare(ReferenceStyle)


def test_autograd_style_needs_no_custom_backward_and_trains_like_the_whole_image() -> None:
    _fit_one_step_and_compare(AutogradStyle)


def test_manual_optimisation_with_no_grad_forward_trains_like_the_whole_image() -> None:
    _fit_one_step_and_compare(ManualOptimisation)


@pytest.mark.parametrize("style", [AutogradStyle, ReferenceStyle])
def test_a_staged_trunk_trains_like_the_whole_image(style: type[StreamingModule]) -> None:
    _fit_one_step_and_compare(style, stages=[5])  # cut after the max pooling


def test_forward_streaming_is_attached_with_grad_and_detached_without() -> None:
    model = AutogradStyle(tiny_trunk(), tiny_head())
    image = image_data(1).tensors[0]
    attached = model.forward_streaming(image)
    assert attached.requires_grad and attached.grad_fn is not None
    model.eval()
    with torch.no_grad():
        detached = model.forward_streaming(image)
    assert not detached.requires_grad
    assert torch.equal(attached.detach(), detached)


def test_backward_streaming_after_an_attached_forward_raises() -> None:
    model = AutogradStyle(tiny_trunk(), tiny_head())
    image = image_data(1).tensors[0]
    model.forward_streaming(image)
    with pytest.raises(StreamingError, match="already streamed"):
        model.backward_streaming(image, torch.ones(1))


def test_backward_streaming_checks_the_image_and_the_gradient() -> None:
    model = ReferenceStyle(tiny_trunk(), tiny_head(), TILE)
    image = image_data(1).tensors[0]
    fmap = model.forward_streaming(image)
    with pytest.raises(StreamingError, match="same image"):
        model.backward_streaming(image.clone(), torch.ones_like(fmap))
    with pytest.raises(ValueError, match="gradient is None"):
        model.backward_streaming(image, None)


def test_backward_streaming_does_nothing_for_a_frozen_trunk() -> None:
    model = AutogradStyle(tiny_trunk(), tiny_head(), train_streaming_layers=False)
    image = image_data(1).tensors[0]
    fmap = model.forward_streaming(image)
    assert not fmap.requires_grad
    model.backward_streaming(image, torch.ones_like(fmap))
    assert all(p.grad is None for p in model.stream_network.stream_module.parameters())


def test_a_detached_forward_never_backpropagated_is_discarded_with_a_warning() -> None:
    model = ReferenceStyle(tiny_trunk(), tiny_head(), TILE)
    image = image_data(1).tensors[0]
    model.forward_streaming(image)
    with pytest.warns(UserWarning, match="never went through backward_streaming"):
        model.forward_streaming(image)
    assert model._awaiting_backward is not None and model._awaiting_backward[0] is image  # the new forward's


def test_frozen_trunk_trains_only_the_head() -> None:
    trunk, head = tiny_trunk(), tiny_head()
    model = AutogradStyle(copy.deepcopy(trunk), copy.deepcopy(head), train_streaming_layers=False)
    assert model.get_trainable_params() == list(model.head.parameters())
    quiet_trainer(max_steps=1).fit(model, loader(image_data(2), 2))
    assert max_difference(model.stream_network.stream_module, trunk) == 0
    assert max_difference(model.head, head) > 1e-3


def test_disabled_streaming_runs_the_whole_image_with_the_same_values_and_gradients() -> None:
    model = AutogradStyle(tiny_trunk(), tiny_head(), mean=[0.1, 0.2, 0.3], std=[1.5, 2.0, 0.5])
    image = image_data(1).tensors[0]
    results = []
    for streaming in (True, False):
        model.enable_streaming_hooks() if streaming else model.disable_streaming_hooks()
        model.zero_grad()
        fmap = model.forward_streaming(image)
        (fmap ** 2).sum().backward()
        results.append((fmap.detach(), [p.grad for p in model.stream_network.stream_module.parameters()]))
    (streamed, streamed_grads), (whole, whole_grads) = results
    assert (streamed - whole).abs().max() <= 1e-10
    assert max((a - b).abs().max().item() for a, b in zip(streamed_grads, whole_grads)) <= 1e-10


@pytest.mark.parametrize("normalise", [False, True])
def test_saliency_map_is_the_whole_image_input_gradient(normalise: bool) -> None:
    options = {"mean": [0.1, 0.2, 0.3], "std": [1.5, 2.0, 0.5]} if normalise else {}
    model = AutogradStyle(tiny_trunk(), tiny_head(), saliency=True, **options)
    image = image_data(1).tensors[0]
    (model.forward_streaming(image) ** 2).sum().backward()
    saliency = model.stream_network.saliency_map
    model.disable_streaming_hooks()
    leaf = image.clone().requires_grad_()
    (model.forward_streaming(leaf) ** 2).sum().backward()
    assert saliency.shape == image.shape and saliency.abs().max() > 0
    assert (saliency - leaf.grad).abs().max() <= 1e-10


def test_batchnorm_stays_in_eval_mode_through_fit_validation_and_train_calls() -> None:
    class WithValidation(AutogradStyle):
        def validation_step(self, batch, batch_idx):
            image, target = batch
            return nn.functional.cross_entropy(self.head(self.forward_streaming(image)), target)

    trunk = tiny_trunk()
    model = WithValidation(copy.deepcopy(trunk), tiny_head())
    model.train()
    assert not model.stream_network.stream_module[1].training and model.head.training
    data = loader(image_data(4), 2)
    quiet_trainer(max_epochs=2, val_check_interval=1).fit(model, data, data)
    assert not model.stream_network.stream_module[1].training
    assert torch.equal(model.stream_network.stream_module[1].running_var, trunk[1].running_var)


def test_tile_size_setter_rebuilds_the_engine_around_the_same_trunk_and_options() -> None:
    model = AutogradStyle(tiny_trunk(), tiny_head(), mean=[0.1, 0.2, 0.3], std=[1.5, 2.0, 0.5], stages=[5])
    image = image_data(1).tensors[0]
    before = model.forward_streaming(image).detach()
    parameters = list(model.parameters())
    grid = model.stream_network.plan(image.shape).grid
    model.tile_size = 24
    assert model.tile_size == (24, 24)
    assert model.stream_network.plan(image.shape).grid != grid
    assert list(model.parameters()) == parameters
    assert model.stream_network.stages == (5,) and model.stream_network.mean.numel() == 3
    assert (model.forward_streaming(image).detach() - before).abs().max() <= 1e-10
    with pytest.raises(TileTooSmallError):
        model.tile_size = 4  # the first stage (up to the max pooling) sees 7 px


def test_configure_tile_stride_is_the_step_between_interior_tiles() -> None:
    model = AutogradStyle(tiny_trunk(), tiny_head(), tile_size=24)
    stride = model.configure_tile_stride()
    plan = model.stream_network.plan((240, 240))
    starts = [tile.input.top for tile in plan.tiles if tile.index[1] == 0]
    assert stride[0] == starts[3] - starts[2] == starts[4] - starts[3]
    assert stride == (stride[0], stride[0]) and 0 < stride[0] <= 24


def test_overridden_start_hooks_compose_with_super(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(StreamingModule, "prepare_start_for_streaming", lambda self: calls.append("prepare"))

    class UserHooks(AutogradStyle):
        def on_train_start(self):
            super().on_train_start()
            calls.append("user")

    quiet_trainer(max_steps=1).fit(UserHooks(tiny_trunk(), tiny_head()), loader(image_data(2), 2))
    assert calls == ["prepare", "user"]
