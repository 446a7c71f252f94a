"""A per-pixel loss streamed tile by tile equals the whole-image loss, with exactly its gradients (float64).

``scnn.stream_loss`` never holds the whole output: for each output tile it runs forward, the
un-reduced loss and backward. These tests compare it with ``loss_fn(trunk(x), t)`` reduced over
the whole image: the loss, every parameter gradient and the image gradient, for means and sums,
ignored pixels and weight maps, batch 2, several tiles per axis and non-square images.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from lightstream import StreamingCNN
from lightstream.core.source import TensorSource
from tests.conftest import relative_error
from tests.core.dense_networks import ResNet18UNet, TinyFPN, TinyUNet, randomise_batch_norm

IGNORE = 255


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, ignore_index=IGNORE, reduction="none")


def _labels(shape: tuple[int, ...], classes: int = 3, ignored: float = 0.0) -> torch.Tensor:
    labels = torch.randint(0, classes, shape)
    if ignored:
        labels[torch.rand(shape) < ignored] = IGNORE
    return labels


def _whole(trunk: nn.Module, image: torch.Tensor, reduce) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The conventional step: loss, every parameter gradient and the image gradient."""
    trunk.zero_grad(set_to_none=True)
    leaf = image.detach().clone().requires_grad_()
    loss = reduce(trunk(leaf))
    loss.backward()
    grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    return loss.detach(), grads, leaf.grad


def _assert_same(loss, expected, trunk, scnn_or_grad, expected_grads, expected_image_grad, tol=1e-10) -> None:
    assert relative_error(loss, expected) <= tol
    for (name, param), grad in zip(trunk.named_parameters(), expected_grads):
        assert param.grad is not None, f"{name} got no gradient"
        assert relative_error(param.grad, grad) <= tol, name
    image_grad = scnn_or_grad.saliency_map if isinstance(scnn_or_grad, StreamingCNN) else scnn_or_grad
    assert relative_error(image_grad, expected_image_grad) <= tol


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("up", ["bilinear", "nearest", "pixel_shuffle"])
def test_a_unet_loss_streamed_tile_by_tile_equals_the_whole_image(up: str, reduction: str) -> None:
    torch.manual_seed(0)
    trunk = randomise_batch_norm(TinyUNet(up))
    image = torch.randn(2, 3, 64, 88, dtype=torch.float64)
    target = _labels((2, 64, 88), ignored=0.1)
    reduce = (lambda o: F.cross_entropy(o, target, ignore_index=IGNORE, reduction=reduction))
    expected, expected_grads, expected_image_grad = _whole(trunk, image, reduce)

    scnn = StreamingCNN(trunk, tile_size=(40, 44), saliency=True)
    assert min(scnn.plan(image.shape).grid) >= 3
    loss = scnn.stream_loss(image, target, cross_entropy, reduction, ignore_index=IGNORE)
    assert not loss.requires_grad and loss.dtype == torch.float64
    _assert_same(loss, expected, trunk, scnn, expected_grads, expected_image_grad)


def test_ignored_pixels_do_not_count_in_the_mean() -> None:
    torch.manual_seed(1)
    trunk = randomise_batch_norm(TinyUNet("bilinear"))
    image = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    target = _labels((2, 48, 64), ignored=0.6)
    scnn = StreamingCNN(trunk, tile_size=(36, 40))
    with torch.no_grad():
        counted = scnn.stream_loss(image, target, cross_entropy, ignore_index=IGNORE)
        all_pixels = scnn.stream_loss(image, target, cross_entropy)  # ignored pixels count as 0 loss
        expected = F.cross_entropy(trunk(image), target, ignore_index=IGNORE)
    assert relative_error(counted, expected) <= 1e-12
    kept = (target != IGNORE).double().mean()
    assert relative_error(all_pixels, expected * kept) <= 1e-12


def test_a_weight_map_weights_the_mean() -> None:
    torch.manual_seed(2)
    trunk = randomise_batch_norm(TinyFPN())
    image = torch.randn(2, 3, 36, 44, dtype=torch.float64)
    target = _labels((2, 36, 44), classes=2)
    weight = torch.rand(2, 36, 44, dtype=torch.float64) * (torch.rand(2, 36, 44) > 0.3)

    def reduce(output: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(output, target, reduction="none") * weight).sum() / weight.sum()

    expected, expected_grads, expected_image_grad = _whole(trunk, image, reduce)
    scnn = StreamingCNN(trunk, tile_size=(20, 24), saliency=True)
    assert min(scnn.plan(image.shape).grid) >= 2
    loss = scnn.stream_loss(image, target, lambda o, t: F.cross_entropy(o, t, reduction="none"), weight=weight)
    _assert_same(loss, expected, trunk, scnn, expected_grads, expected_image_grad)


def test_stream_loss_autograd_delivers_the_gradients_through_autograd() -> None:
    torch.manual_seed(3)
    trunk = randomise_batch_norm(TinyUNet("nearest"))
    image = torch.randn(2, 3, 48, 56, dtype=torch.float64)
    target = _labels((2, 48, 56))
    expected, expected_grads, expected_image_grad = _whole(trunk, image, lambda o: 3 * F.cross_entropy(o, target))

    scnn = StreamingCNN(trunk, tile_size=(36, 36))
    leaf = image.clone().requires_grad_()
    loss = scnn.stream_loss_autograd(leaf, target, cross_entropy)
    assert loss.requires_grad and all(p.grad is None for p in trunk.parameters())  # nothing until backward
    (3 * loss).backward()
    _assert_same(3 * loss.detach(), expected, trunk, leaf.grad, expected_grads, expected_image_grad)


def test_gradients_accumulate_onto_existing_ones_like_autograd() -> None:
    torch.manual_seed(4)
    trunk = randomise_batch_norm(TinyUNet("bilinear"))
    image = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    target = _labels((1, 40, 40))
    scnn = StreamingCNN(trunk, tile_size=32)
    scnn.stream_loss(image, target, cross_entropy)
    once = [p.grad.clone() for p in trunk.parameters()]
    scnn.stream_loss(image, target, cross_entropy)
    for param, grad in zip(trunk.parameters(), once):
        assert relative_error(param.grad, 2 * grad) <= 1e-12


def test_without_gradients_it_only_computes_the_loss() -> None:
    torch.manual_seed(5)
    trunk = randomise_batch_norm(TinyUNet("bilinear"))
    image = torch.randn(1, 3, 40, 48, dtype=torch.float64)
    target = _labels((1, 40, 48))
    scnn = StreamingCNN(trunk, tile_size=32, saliency=True)
    with torch.no_grad():
        loss = scnn.stream_loss(image, target, cross_entropy)
        expected = F.cross_entropy(trunk(image), target)
    assert relative_error(loss, expected) <= 1e-12
    assert all(p.grad is None for p in trunk.parameters()) and scnn.saliency_map is None


def test_a_one_channel_mask_source_is_a_class_index_target() -> None:
    torch.manual_seed(6)
    trunk = randomise_batch_norm(TinyUNet("bilinear"))
    image = torch.randn(2, 3, 48, 52, dtype=torch.float64)
    target = _labels((2, 48, 52))
    mask = TensorSource(target.to(torch.uint8).unsqueeze(1))  # what a label-mask slide reads
    scnn = StreamingCNN(trunk, tile_size=36)
    with torch.no_grad():
        from_source = scnn.stream_loss(image, mask, lambda o, t: F.cross_entropy(o, t.long(), reduction="none"))
        expected = F.cross_entropy(trunk(image), target)
    assert relative_error(from_source, expected) <= 1e-12


def test_metrics_updated_per_tile_equal_the_whole_image_metrics() -> None:
    torch.manual_seed(7)
    trunk = randomise_batch_norm(TinyUNet("bilinear"))
    image = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    target = _labels((2, 48, 64))
    # Dice is F1 from confusion counts, which add up over tiles (torchmetrics' DiceScore averages
    # per-sample scores instead, so a tile would count as a sample).
    metrics = [MulticlassF1Score(3, average="macro"), MulticlassJaccardIndex(3)]
    tiles = []

    def on_tile(output: torch.Tensor, tile_target: torch.Tensor) -> None:
        tiles.append(output.shape[-2:])
        for metric in metrics:
            metric.update(output.argmax(1), tile_target)

    scnn = StreamingCNN(trunk, tile_size=(36, 40))
    with torch.no_grad():
        scnn.stream_loss(image, target, cross_entropy, on_tile=on_tile)
        whole = trunk(image).argmax(1)
    assert len(tiles) == len(scnn.plan(image.shape).tiles) >= 4
    assert sum(h * w for h, w in tiles) == 48 * 64
    for metric, expected in zip(metrics, [MulticlassF1Score(3, average="macro"), MulticlassJaccardIndex(3)]):
        expected.update(whole, target)
        assert abs(metric.compute().item() - expected.compute().item()) <= 1e-6


def test_output_tiles_partition_the_output_and_equal_the_whole_image() -> None:
    torch.manual_seed(8)
    trunk = randomise_batch_norm(TinyFPN())
    image = torch.randn(2, 3, 36, 44, dtype=torch.float64)
    scnn = StreamingCNN(trunk, tile_size=(20, 24))
    expected = trunk(image).detach()
    covered = torch.zeros(expected.shape[-2:], dtype=torch.int64)
    for tile, rows, cols in scnn.output_tiles(image):
        assert not tile.requires_grad
        torch.testing.assert_close(tile, expected[:, :, rows[0]:rows[1], cols[0]:cols[1]], rtol=0, atol=1e-12)
        covered[rows[0]:rows[1], cols[0]:cols[1]] += 1
    assert bool((covered == 1).all()) and scnn.plan(image.shape).grid[0] >= 2


@pytest.mark.slow
def test_a_resnet18_unet_loss_streams_exactly() -> None:
    torch.manual_seed(9)
    trunk = randomise_batch_norm(ResNet18UNet())
    image = torch.randn(1, 3, 960, 992, dtype=torch.float64)
    target = _labels((1, 960, 992), classes=2, ignored=0.05)
    expected, expected_grads, expected_image_grad = _whole(
        trunk, image, lambda o: F.cross_entropy(o, target, ignore_index=IGNORE))
    scnn = StreamingCNN(trunk, tile_size=(736, 768), saliency=True)
    assert min(scnn.plan(image.shape).grid) >= 2
    loss = scnn.stream_loss(image, target, cross_entropy, ignore_index=IGNORE)
    _assert_same(loss, expected, trunk, scnn, expected_grads, expected_image_grad)


# ---------------------------------------------------------------- misuse
@pytest.fixture
def unet() -> StreamingCNN:
    torch.manual_seed(0)
    return StreamingCNN(randomise_batch_norm(TinyUNet("bilinear")), tile_size=32)


def test_a_reduced_loss_is_refused_before_any_gradient(unet: StreamingCNN) -> None:
    image, target = torch.randn(1, 3, 40, 40, dtype=torch.float64), _labels((1, 40, 40))
    with pytest.raises(ValueError, match="un-reduced per-pixel loss"):
        unet.stream_loss(image, target, lambda o, t: F.cross_entropy(o, t))
    assert all(p.grad is None for p in unet.stream_module.parameters())


@pytest.mark.parametrize(("target", "words"), [
    (torch.zeros(1, 40, 32, dtype=torch.long), "not aligned with the trunk's output (batch 1, 40x40 px)"),
    (torch.zeros(2, 40, 40, dtype=torch.long), "(2, 1, 40, 40) is not aligned"),
    (torch.zeros(40, 40, dtype=torch.long), "[B, h, w] or [B, K, h, w]"),
    ([[0]], "tensor or an ImageSource"),
])
def test_a_misaligned_target_is_refused_naming_both_shapes(unet: StreamingCNN, target, words: str) -> None:
    with pytest.raises((ValueError, TypeError)) as error:
        unet.stream_loss(torch.randn(1, 3, 40, 40, dtype=torch.float64), target, cross_entropy)
    assert words in str(error.value)


def test_an_unknown_reduction_is_refused(unet: StreamingCNN) -> None:
    with pytest.raises(ValueError, match="'mean', 'sum'"):
        unet.stream_loss(torch.randn(1, 3, 40, 40, dtype=torch.float64), _labels((1, 40, 40)), cross_entropy,
                         reduction="none")


def test_a_weight_map_that_does_not_broadcast_is_refused(unet: StreamingCNN) -> None:
    image, target = torch.randn(1, 3, 40, 40, dtype=torch.float64), torch.rand(1, 3, 40, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not broadcast"):
        unet.stream_loss(image, target, lambda o, t: F.mse_loss(o, t, reduction="none").sum(1),
                         weight=torch.ones(1, 2, 40, 40))


class _LazyImage:
    """An image read one rectangle at a time, as a slide level is (a non-tensor source)."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image_data = image

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.image_data.shape)

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        return self.image_data[:, :, rows, cols].clone()


def test_tiles_batched_together_and_a_lazy_image_give_the_same_loss_and_gradients() -> None:
    torch.manual_seed(10)
    trunk = randomise_batch_norm(TinyUNet("pixel_shuffle"))
    image = torch.randn(2, 3, 80, 80, dtype=torch.float64)
    target = _labels((2, 80, 80), ignored=0.2)
    expected, expected_grads, _ = _whole(trunk, image, lambda o: F.cross_entropy(o, target, ignore_index=IGNORE))
    scnn = StreamingCNN(trunk, tile_size=36, tile_batch=4)
    assert scnn.loss_plan(image.shape).stages[0].tile_batch > 1, "the test must batch tiles"
    assert StreamingCNN(trunk, tile_size=36).loss_plan(image.shape).stages[0].tile_batch == 1  # "auto": one
    loss = scnn.stream_loss(_LazyImage(image), target, cross_entropy, ignore_index=IGNORE)
    assert relative_error(loss, expected) <= 1e-10
    for (name, param), grad in zip(trunk.named_parameters(), expected_grads):
        assert relative_error(param.grad, grad) <= 1e-10, name


def test_the_per_tile_loss_estimate_counts_no_recompute_and_no_stitched_output() -> None:
    from lightstream import TimeModel

    trunk = TinyUNet("bilinear").eval()
    scnn = StreamingCNN(trunk, tile_size=128, tile_batch=1)  # both steps then hold one tile at a time
    shape = (1, 3, 1024, 1024)
    streamed_loss = scnn.estimate(shape, time_model=TimeModel(), per_tile_loss=True)
    forward_backward = scnn.estimate(shape, time_model=TimeModel())
    assert streamed_loss.feature_map_bytes == 0 and forward_backward.feature_map_bytes == 3 * 1024 * 1024 * 4
    # multiply-adds only: each tile runs once forward and once backward, like the whole image
    assert streamed_loss.relative_time == pytest.approx(streamed_loss.recompute_factor, rel=1e-9)
    assert forward_backward.relative_time == pytest.approx(4 / 3 * forward_backward.recompute_factor, rel=1e-9)
    # the same tile backward, without the stitched output and its gradient
    assert streamed_loss.peak_bytes == forward_backward.peak_bytes - 2 * forward_backward.feature_map_bytes
    assert streamed_loss.whole_image_bytes == forward_backward.whole_image_bytes
