"""Misuse of the engine fails at the call that made it, naming the value, and loses nothing.

Settings are validated when given; a backward checks its forward record as autograd checks its
saved tensors; a trace is redone when what it baked in changed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightstream import StaleForwardError, StreamingCNN, TileTooSmallError
from tests.conftest import relative_error, small_trunk, whole_image_reference


def _trunk() -> nn.Module:
    return small_trunk().double()


def _image(batch: int = 2, size: tuple[int, int] = (40, 36)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, dtype=torch.float64)


# ---------------------------------------------------------------------- settings at the door
@pytest.mark.parametrize(("tile", "error", "fragment"), [
    ("99", TypeError, "'99'"),
    (True, TypeError, "True"),
    (32.7, TypeError, "32.7"),
    (math.nan, TypeError, "nan"),
    (0, ValueError, "positive"),
    (-16, ValueError, "-16"),
    ((16,), ValueError, "(16,)"),
    ((16, "16"), TypeError, "width"),
    (None, TypeError, "None"),
], ids=["string", "bool", "float", "nan", "zero", "negative", "one-value", "string-width", "none-setter"])
def test_tile_sizes_must_be_positive_integers(tile: object, error: type, fragment: str) -> None:
    scnn = StreamingCNN(_trunk(), tile_size=16)
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        scnn.tile_size = tile  # type: ignore[assignment]
    assert scnn.tile_size == (16, 16)  # a refused setting changes nothing
    if tile is not None:
        with pytest.raises(error):
            StreamingCNN(_trunk(), tile_size=tile)  # type: ignore[arg-type]


def test_a_tile_below_the_receptive_field_set_later_is_refused_and_the_old_tile_kept() -> None:
    scnn = StreamingCNN(_trunk(), tile_size=16, stages=None)
    with pytest.raises(TileTooSmallError, match="smallest tile that works is 12 px"):
        scnn.tile_size = 8
    assert scnn.tile_size == (16, 16)


def test_setting_the_tile_size_replans_exactly() -> None:
    trunk, image = _trunk(), _image()
    scnn = StreamingCNN(trunk, tile_size=40)
    assert len(scnn.plan(image.shape)) == 1
    scnn.tile_size = 16
    assert len(scnn.plan(image.shape)) > 1
    grad = torch.randn(2, 4, 10, 9, dtype=torch.float64)
    expected, grads, _ = whole_image_reference(trunk, image, grad)
    assert relative_error(scnn(image), expected) <= 1e-12
    scnn.backward(image, grad)
    for param, want in zip(trunk.parameters(), grads):
        assert relative_error(param.grad, want) <= 1e-10


@pytest.mark.parametrize(("stages", "error", "fragment"), [
    ([100], ValueError, "before child 100: it has 7 children"),
    ([0], ValueError, "in 1..6"),
    ("foo", ValueError, "'foo'"),
    ([3, 3], ValueError, "repeat"),
    ([2.5], TypeError, "2.5"),
    ([True], TypeError, "True"),
], ids=["beyond-the-end", "zero", "string", "repeated", "float", "bool"])
def test_explicit_stages_must_be_cut_points_inside_the_trunk(stages: object, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        StreamingCNN(_trunk(), tile_size=16, stages=stages)  # type: ignore[arg-type]


def test_explicit_stages_are_sorted() -> None:
    assert StreamingCNN(_trunk(), tile_size=16, stages=[5, 3]).stages == (3, 5)


@pytest.mark.parametrize(("memory", "error"), [(-1, ValueError), (0, ValueError), (True, TypeError),
                                               ("lots", TypeError), (1.5e9, TypeError)])
def test_stage_memory_must_be_positive_bytes_or_auto(memory: object, error: type) -> None:
    with pytest.raises(error, match="stage_memory"):
        StreamingCNN(_trunk(), tile_size=16, stage_memory=memory)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mean", "std", "fragment"), [
    ([0.5, 0.5], None, "mean has 2 values but the trunk's first convolution reads 3 channels"),
    (None, [1.0, 0.0, 1.0], "std has a zero"),
    ([0.5, math.nan, 0.5], None, "mean must be finite"),
    (None, [1.0, 2.0, 3.0, 4.0], "std has 4 values"),
    ("abc", None, "mean must be a sequence of numbers"),
], ids=["mean-too-short", "zero-std", "nan-mean", "std-too-long", "string-mean"])
def test_normalisation_vectors_must_fit_the_trunks_channels(mean: object, std: object, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError), match=fragment):
        StreamingCNN(_trunk(), tile_size=16, mean=mean, std=std)  # type: ignore[arg-type]


def test_mean_and_std_changed_after_the_first_call_are_honoured() -> None:
    trunk, image = _trunk(), _image()
    scnn = StreamingCNN(trunk, tile_size=16, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]).double()
    assert relative_error(scnn(image), trunk(image).detach()) <= 1e-12
    scnn.mean.fill_(0.25)
    scnn.std.copy_(torch.tensor([2.0, 3.0, 4.0]))
    std = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert relative_error(scnn(image), trunk((image - 0.25) / std).detach()) <= 1e-12


def test_a_zero_std_set_after_construction_is_refused_at_the_next_call() -> None:
    scnn = StreamingCNN(_trunk(), tile_size=16, std=[1.0, 1.0, 1.0])
    scnn.std[1] = 0.0
    with pytest.raises(ValueError, match="std has a zero"):
        scnn(_image())


# ---------------------------------------------------------------------- images at the door
def test_a_float32_image_into_a_float64_trunk_is_cast_losslessly_and_exact() -> None:
    trunk, image = _trunk(), _image().float()
    scnn = StreamingCNN(trunk, tile_size=16)
    out = scnn(image)
    assert out.dtype == torch.float64
    assert relative_error(out, trunk(image.double()).detach()) <= 1e-12


def test_a_float64_image_into_a_float32_trunk_is_refused_not_rounded() -> None:
    scnn = StreamingCNN(small_trunk(), tile_size=16)
    with pytest.raises(TypeError, match="the image is torch.float64 but the trunk computes in torch.float32"):
        scnn(_image())


@pytest.mark.parametrize(("image", "fragment"), [
    (torch.randn(3, 40, 40), r"\[B, C, H, W\], got \(3, 40, 40\)"),
    (torch.randn(1, 4, 40, 40), "4 channels but the trunk's first convolution reads 3"),
    (torch.randn(0, 3, 40, 40), "empty axis"),
    (torch.zeros(1, 3, 40, 40, dtype=torch.bool), "cannot stream a torch.bool image"),
], ids=["rank-3", "wrong-channels", "empty-batch", "bool"])
def test_images_of_the_wrong_shape_or_kind_are_refused_with_their_shape(image: torch.Tensor, fragment: str) -> None:
    scnn = StreamingCNN(small_trunk(), tile_size=16)
    with pytest.raises((ValueError, TypeError), match=fragment):
        scnn(image)


@pytest.mark.parametrize(("shape", "dtype", "fragment"), [
    ((0, 3, 64, 64), torch.float32, "empty axis"),
    ((3, 64, 64), torch.float32, "3 dimensions"),
    ((1, 3, 64, 64), torch.int64, "floating-point"),
    ((1, 2, 64, 64), torch.float32, "2 channels"),
], ids=["batch-0", "rank-3", "integer-dtype", "wrong-channels"])
def test_estimate_arguments_are_checked(shape: tuple[int, ...], dtype: torch.dtype, fragment: str) -> None:
    scnn = StreamingCNN(small_trunk(), tile_size=16)
    with pytest.raises((ValueError, TypeError), match=fragment):
        scnn.estimate(shape, dtype)


# ---------------------------------------------------------------------- the forward record
def test_weights_changed_in_place_between_forward_and_backward_are_refused_naming_the_parameter() -> None:
    trunk, image = _trunk(), _image()
    scnn = StreamingCNN(trunk, tile_size=16)
    fmap = scnn(image)
    with torch.no_grad():
        trunk[3].weight.add_(1.0)  # an optimizer.step() in the wrong place
    with pytest.raises(StaleForwardError, match="trunk parameter '3.weight' was modified in place"):
        scnn.backward(image, torch.ones_like(fmap))
    assert all(p.grad is None for p in trunk.parameters())  # nothing was accumulated


def test_weights_changed_in_place_before_autograds_backward_are_refused() -> None:
    trunk, image = _trunk(), _image()
    loss = StreamingCNN(trunk, tile_size=16).forward_autograd(image).sum()
    with torch.no_grad():
        trunk[0].bias.mul_(2.0)
    with pytest.raises(StaleForwardError, match="'0.bias' was modified in place"):
        loss.backward()


def test_an_image_changed_in_place_after_the_forward_is_refused() -> None:
    image = _image()
    scnn = StreamingCNN(_trunk(), tile_size=16)
    fmap = scnn(image)
    image.mul_(2.0)
    with pytest.raises(StaleForwardError, match="image was modified in place"):
        scnn.backward(image, torch.ones_like(fmap))


def test_a_second_backward_of_one_forward_is_refused_instead_of_doubling_gradients() -> None:
    trunk, image = _trunk(), _image()
    scnn = StreamingCNN(trunk, tile_size=16)
    fmap = scnn(image)
    scnn.backward(image, torch.ones_like(fmap))
    once = [p.grad.clone() for p in trunk.parameters()]
    with pytest.raises(StaleForwardError, match="already been backpropagated"):
        scnn.backward(image, torch.ones_like(fmap))
    assert all(torch.equal(p.grad, g) for p, g in zip(trunk.parameters(), once))


def test_a_second_autograd_backward_with_retain_graph_is_refused() -> None:
    image = _image()
    loss = StreamingCNN(_trunk(), tile_size=16).forward_autograd(image).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(StaleForwardError, match="already been backpropagated"):
        loss.backward()


def test_a_backward_for_another_image_is_refused() -> None:
    scnn = StreamingCNN(_trunk(), tile_size=16)
    fmap = scnn(_image())
    with pytest.raises(StaleForwardError, match="another image"):
        scnn.backward(_image(), torch.ones_like(fmap))


def test_a_backward_without_a_forward_is_refused() -> None:
    with pytest.raises(StaleForwardError, match=r"call scnn\(image\) first"):
        StreamingCNN(_trunk(), tile_size=16).backward(_image(), torch.ones(2, 4, 10, 9))


def test_a_refused_backward_loses_nothing_a_correct_one_can_follow() -> None:
    trunk, image = _trunk(), _image()
    scnn = StreamingCNN(trunk, tile_size=16)
    fmap = scnn(image)
    with pytest.raises(ValueError, match="grad has shape"):
        scnn.backward(image, torch.ones(2, 4, 3, 3, dtype=torch.float64))
    grad = torch.randn_like(fmap)
    scnn.backward(image, grad)
    streamed = [p.grad.clone() for p in trunk.parameters()]
    _, grads, _ = whole_image_reference(trunk, image, grad)
    for got, want in zip(streamed, grads):
        assert relative_error(got, want) <= 1e-10


def test_mean_changed_between_forward_and_backward_is_refused() -> None:
    image = _image()
    scnn = StreamingCNN(_trunk(), tile_size=16, mean=[0.0, 0.0, 0.0])
    fmap = scnn(image)
    scnn.mean.add_(1.0)
    with pytest.raises(StaleForwardError, match="mean or std changed"):
        scnn.backward(image, torch.ones_like(fmap))


# ---------------------------------------------------------------------- stale traces
class Scaled(nn.Module):
    """Reads a plain Python attribute in its forward (baked into a trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


def test_a_python_attribute_changed_after_the_first_call_is_traced_again() -> None:
    trunk, image = Scaled().double(), _image()
    scnn = StreamingCNN(trunk, tile_size=16)
    scnn(image)
    trunk.scale = 5.0
    assert relative_error(scnn(image), trunk(image).detach()) <= 1e-12


def test_a_convolution_stride_changed_after_the_first_call_is_traced_again_and_exact() -> None:
    trunk, image = _trunk(), _image(size=(48, 44))
    scnn = StreamingCNN(trunk, tile_size=24, stages=None)
    scnn(image)
    trunk[3].stride = (2, 2)
    assert scnn.output_stride == (8, 8)
    assert relative_error(scnn(image), trunk(image).detach()) <= 1e-12


def test_a_trunk_changed_between_forward_and_backward_is_refused() -> None:
    trunk, image = _trunk(), _image()
    scnn = StreamingCNN(trunk, tile_size=16)
    fmap = scnn(image)
    trunk[1] = nn.Tanh()
    with pytest.raises(StaleForwardError, match="modules, train/eval modes or attributes changed"):
        scnn.backward(image, torch.ones_like(fmap))


def test_plans_take_one_image_chw_or_hw_like_a_batch_of_one() -> None:
    scnn = StreamingCNN(_trunk(), tile_size=16)
    batch = scnn.plan((1, 3, 40, 36))
    assert scnn.plan((3, 40, 36)) == batch and scnn.plan((40, 36)) == batch
