"""Dense prediction: upsampling, transposed convolution and skip merges stream exactly (float64).

Each decoder operation is checked two ways: on every crop of a small map, the values the graph
keeps equal the whole map's at those positions (the geometry is brute-forced), and whole
segmentation networks (U-Nets, an FPN) stream with the output, every parameter gradient and the
image gradient equal to the whole-image computation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightstream import StreamingCNN
from lightstream.core.errors import UnsupportedLayerError
from lightstream.core.graph import TrunkGraph
from tests.conftest import assert_streaming_exact, relative_error
from tests.core.dense_networks import ResNet18UNet, TinyFPN, TinyUNet, randomise_batch_norm

DECODER_OPS = {
    "nearest x2": nn.Upsample(scale_factor=2, mode="nearest"),
    "nearest x4": nn.Upsample(scale_factor=4, mode="nearest"),
    "nearest-exact x2": nn.Upsample(scale_factor=2, mode="nearest-exact"),
    "bilinear x2": nn.Upsample(scale_factor=2, mode="bilinear"),
    "bilinear x4": nn.Upsample(scale_factor=4, mode="bilinear"),
    "bicubic x2": nn.Upsample(scale_factor=2, mode="bicubic"),
    "bilinear (2, 1)": nn.Upsample(scale_factor=(2, 1), mode="bilinear"),
    "bicubic (1, 4)": nn.Upsample(scale_factor=(1, 4), mode="bicubic"),
    "transpose k2 s2": nn.ConvTranspose2d(3, 2, 2, stride=2),
    "transpose k3 s2 p1 op1": nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
    "transpose k4 s2 p1": nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1),
    "transpose k3 s1 p1": nn.ConvTranspose2d(3, 2, 3, padding=1),
    "transpose k1 s3": nn.ConvTranspose2d(3, 2, 1, stride=3),
    "transpose k3 s3 d2 p2 op2 groups": nn.ConvTranspose2d(3, 3, 3, stride=3, dilation=2, padding=2,
                                                           output_padding=2, groups=3),
    "transpose (2,3) s(2,3) p(0,1)": nn.ConvTranspose2d(3, 2, (2, 3), stride=(2, 3), padding=(0, 1)),
    "pixel shuffle 2": nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2)),
    "pixel unshuffle 2": nn.PixelUnshuffle(2),
}


@pytest.mark.parametrize("name", DECODER_OPS)
def test_every_crop_of_a_decoder_op_keeps_only_whole_map_values(name: str) -> None:
    op = nn.Sequential(DECODER_OPS[name]).double().eval()
    image = torch.randn(1, 3, 8, 10, dtype=torch.float64)
    graph = TrunkGraph(op)
    sizes = graph.sizes(8, 10)
    expected = op(image)
    assert expected.shape[-2:] == sizes[graph.output]
    covered = torch.zeros(expected.shape[-2:], dtype=torch.bool)
    for (top, bottom), (left, right) in itertools.product(itertools.combinations(range(9), 2),
                                                          [(0, 10), (3, 7), (0, 4), (6, 10)]):
        exact = [graph.exact_spans(span, axis, sizes)[graph.output] for axis, span in
                 enumerate([(top, bottom), (left, right)])]
        if any(hi <= lo for lo, hi in exact):
            continue  # nothing is exact from so thin a crop
        run = graph.run(image[..., top:bottom, left:right], (top, bottom), (left, right), sizes)
        out, (rows, cols) = run.exact_value, run.exact
        assert out.shape[-2:] == (rows[1] - rows[0], cols[1] - cols[0])
        torch.testing.assert_close(out, expected[..., rows[0]:rows[1], cols[0]:cols[1]], rtol=0, atol=1e-12)
        covered[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert covered.all(), "some output is exact from no crop at all"


@pytest.mark.parametrize("name", DECODER_OPS)
def test_the_input_a_decoder_op_needs_gives_exactly_the_wanted_outputs(name: str) -> None:
    graph = TrunkGraph(nn.Sequential(DECODER_OPS[name]))
    sizes = graph.sizes(8, 10)
    rows = sizes[graph.output][0]
    for lo, hi in itertools.combinations(range(rows + 1), 2):
        need = graph.needed_span((lo, hi), 0, sizes)
        got = graph.exact_spans(need, 0, sizes)[graph.output]
        assert got[0] <= lo and got[1] >= hi, f"outputs {lo, hi} need {need}, which gives only {got}"


@pytest.mark.parametrize("up", ["bilinear", "nearest", "pixel_shuffle"])
def test_a_unet_streams_exactly(up: str) -> None:
    torch.manual_seed(0)
    trunk = randomise_batch_norm(TinyUNet(up))
    scnn = assert_streaming_exact(trunk, torch.randn(2, 3, 64, 88, dtype=torch.float64), (40, 44),
                                  min_tiles_per_axis=3)
    assert scnn.output_stride == (1, 1)
    plan = scnn.plan((2, 3, 64, 88))
    owned = torch.zeros(plan.output_size, dtype=torch.int64)
    for tile in plan.tiles:
        owned[tile.output.rows, tile.output.cols] += 1
    assert plan.output_size == (64, 88) and bool((owned == 1).all())


def test_an_fpn_top_down_path_streams_exactly() -> None:
    torch.manual_seed(0)
    trunk = randomise_batch_norm(TinyFPN())
    assert_streaming_exact(trunk, torch.randn(2, 3, 36, 44, dtype=torch.float64), (20, 24))


@pytest.mark.slow
def test_a_resnet18_unet_streams_exactly() -> None:
    torch.manual_seed(0)
    trunk = randomise_batch_norm(ResNet18UNet())
    assert_streaming_exact(trunk, torch.randn(1, 3, 960, 992, dtype=torch.float64), (736, 768))


def test_forward_autograd_of_a_unet_matches_the_whole_image() -> None:
    torch.manual_seed(0)
    trunk = randomise_batch_norm(TinyUNet("bilinear"))
    image = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    scnn = StreamingCNN(trunk, tile_size=(36, 40))
    weights = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    expected = (trunk(image) * weights).sum()
    expected.backward()
    expected_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    streamed = (scnn.forward_autograd(image) * weights).sum()
    streamed.backward()
    assert relative_error(streamed.detach(), expected.detach()) <= 1e-12
    for param, grad in zip(trunk.parameters(), expected_grads):
        assert relative_error(param.grad, grad) <= 1e-10


@pytest.mark.parametrize(("layer", "words"), [
    (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), "align_corners=True"),
    (nn.UpsamplingBilinear2d(scale_factor=2), "align_corners=True"),
    (nn.Upsample(size=(16, 16)), "size="),
    (nn.Upsample(scale_factor=1.5), "whole number"),
    (nn.Upsample(scale_factor=2, mode="area"), "mode='area'"),
    (nn.Upsample(scale_factor=3, mode="bilinear"), "not a power of two"),
    (nn.Upsample(scale_factor=(2, 6), mode="bicubic"), "not a power of two"),
    (nn.Upsample(scale_factor=3, mode="nearest"), "not a power of two"),
])
def test_non_local_upsampling_is_refused_naming_the_module(layer: nn.Module, words: str) -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer)
    with pytest.raises(UnsupportedLayerError, match="1") as error:
        StreamingCNN(trunk, tile_size=32)
    assert words in str(error.value)


def test_transposed_convolution_with_output_size_is_refused() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(x, output_size=[64, 64])

    with pytest.raises(UnsupportedLayerError, match="output_size") as error:
        StreamingCNN(Fixed(), tile_size=32)
    assert "up" in str(error.value)


def test_global_pooling_in_a_decoder_is_refused_naming_the_module() -> None:
    class GlobalContext(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.context = nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y + F.interpolate(self.context(y), scale_factor=8)

    with pytest.raises(UnsupportedLayerError, match="context"):
        StreamingCNN(GlobalContext(), tile_size=32)


def test_a_trunk_finer_than_the_image_has_a_fractional_stride_and_its_tiles_partition_the_output() -> None:
    from fractions import Fraction

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1,
                                                                                         output_padding=1),
                          nn.Conv2d(4, 18, 1), nn.PixelShuffle(3), nn.Conv2d(2, 2, 3, padding=1)).double()
    scnn = assert_streaming_exact(trunk, torch.randn(2, 3, 30, 26, dtype=torch.float64), (12, 10))
    assert scnn.output_stride == (Fraction(1, 6), Fraction(1, 6))
    plan = scnn.plan((2, 3, 30, 26))
    assert plan.output_size == (180, 156)
    owned = torch.zeros(plan.output_size, dtype=torch.int64)
    for tile in plan.tiles:
        owned[tile.output.rows, tile.output.cols] += 1
    assert bool((owned == 1).all())
    rows, cols = plan.tile_stride  # image pixels between interior tiles: output cells times 1/6
    assert isinstance(rows, (int, Fraction)) and 0 < rows < 12 and 0 < cols < 10


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic"])
def test_power_of_two_upsampling_is_bit_exact_in_float32_far_from_the_origin(mode: str) -> None:
    # The reason other factors are refused: with 1/factor a power of two, PyTorch's source
    # positions are exact floats, so a crop far from the origin matches the whole map bit for bit.
    torch.manual_seed(0)
    graph = TrunkGraph(nn.Sequential(nn.Upsample(scale_factor=4, mode=mode)))
    image = torch.randn(1, 1, 4, 40000)
    sizes = graph.sizes(4, 40000)
    expected = graph.trunk(image)
    run = graph.run(image[..., 35000:35100], (0, 4), (35000, 35100), sizes)
    out, (rows, cols) = run.exact_value, run.exact
    assert cols[1] - cols[0] >= 380
    assert torch.equal(out, expected[..., rows[0]:rows[1], cols[0]:cols[1]])


def test_an_image_size_the_unet_cannot_run_on_is_refused_naming_the_merge_and_a_size_that_works() -> None:
    from lightstream import ImageSizeError

    trunk = randomise_batch_norm(TinyUNet("bilinear"))  # two poolings: sides must be multiples of 4
    with pytest.raises(RuntimeError):
        trunk(torch.zeros(1, 3, 42, 44, dtype=torch.float64))  # the whole network fails on 42 rows
    scnn = StreamingCNN(trunk, tile_size=32)
    with pytest.raises(ImageSizeError) as error:
        scnn.stream_loss(torch.zeros(1, 3, 42, 44, dtype=torch.float64), torch.zeros(1, 42, 44, dtype=torch.long),
                         lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert error.value.path == "cat" and error.value.suggestion == (44, 44)
    assert "42x44 image" in str(error.value) and "e.g. 44x44" in str(error.value)
    with pytest.raises(ImageSizeError):
        scnn(torch.zeros(1, 3, 40, 46, dtype=torch.float64))
    assert scnn.plan((1, 3, 44, 44)).output_size == (44, 44)


def test_the_minimum_tile_of_a_unet_holds_every_output_pixels_receptive_field() -> None:
    # A U-Net's full-resolution pixels need different spans depending on their position modulo
    # the coarsest stride (depth 3: 92 px in the middle, 100 px one pixel over); the minimum tile
    # must hold the widest, so every tile size from it plans.
    from lightstream import TileTooSmallError
    from lightstream.models import UNet

    scnn = StreamingCNN(UNet(3, 2, depth=3, width=4), tile_size=128)
    graph, sizes = scnn.geometry.graph, scnn.geometry.graph.sizes(256, 256)
    fields = [graph.needed_span((o, o + 1), 0, sizes) for o in range(100, 140)]
    assert {hi - lo for lo, hi in fields} == {92, 100}
    assert scnn.geometry.min_tile_size() == (100, 100)
    for side in range(100, 108):
        assert scnn.geometry.plan((256, 256), side).output_size == (256, 256)
    with pytest.raises(TileTooSmallError):
        scnn.geometry.plan((256, 256), 99)
