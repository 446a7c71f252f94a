"""Streaming equals whole-image training (float64) on awkward hand-made trunks."""

from __future__ import annotations

import torch
from torch import nn

from lightstream import StreamingCNN
from tests.conftest import assert_streaming_exact, relative_error


class Residual(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class Concat(nn.Module):
    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class ChannelLayerNorm(nn.Module):
    """ConvNeXt-style LayerNorm over channels of an NCHW map, with a layer scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -1, 1)
    return bn


def _run(trunk: nn.Module, shape: tuple[int, ...], tile) -> StreamingCNN:
    return assert_streaming_exact(trunk.double().eval(), torch.randn(*shape, dtype=torch.float64), tile)


def test_asymmetric_kernels_strides_and_tuple_padding_are_exact() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, (1, 7), padding=(0, 3)), nn.ReLU(),
                          nn.Conv2d(4, 4, (7, 1), stride=(2, 1), padding=(3, 0)),
                          nn.Conv2d(4, 3, (3, 5), stride=(1, 3), padding=(2, 1), bias=False))
    _run(trunk, (2, 3, 61, 79), (24, 30))


def test_dilation_and_groups_are_exact() -> None:
    trunk = nn.Sequential(nn.Conv2d(4, 8, 3, dilation=2, padding=2, groups=2), nn.GELU(),
                          nn.Conv2d(8, 8, 3, dilation=3, padding=1, groups=8),
                          nn.Conv2d(8, 2, 5, stride=2, dilation=2, padding=0))
    _run(trunk, (1, 4, 70, 66), 40)


def test_same_and_valid_padding_with_even_kernels_are_exact() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.SiLU(), nn.Conv2d(4, 4, 3, padding="valid"),
                          nn.Conv2d(4, 4, (2, 6), padding="same", dilation=(3, 1)))
    _run(trunk, (1, 3, 53, 47), 26)


def test_pooling_variants_are_exact() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, padding=1),
                          nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
                          nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                          nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 3, 1))
    _run(trunk, (2, 3, 115, 133), 64)


def test_reflect_padding_is_exact() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="replicate"))
    _run(trunk, (1, 3, 45, 51), 22)


def test_eval_batchnorm_affine_parameters_get_exact_gradients() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _bn(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, stride=2, padding=1), _bn(6), nn.ReLU6())
    _run(trunk, (3, 3, 64, 72), 30)


def test_residual_concat_layernorm_and_layer_scale_are_exact() -> None:
    block = Residual(nn.Sequential(nn.Conv2d(6, 6, 7, padding=3, groups=6), ChannelLayerNorm(6),
                                   nn.Conv2d(6, 6, 1), nn.Hardswish()))
    down = Residual(nn.Sequential(nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1)),
                    nn.Conv2d(6, 6, 1, stride=2))
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), block, down,
                          Concat(nn.Conv2d(6, 2, 3, padding=1), nn.MaxPool2d(3, 1, padding=1)))
    _run(trunk, (2, 3, 80, 64), 48)


def test_image_sizes_that_are_not_multiples_of_the_stride_are_exact() -> None:
    trunk = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 5, 3, stride=2))
    _run(trunk, (1, 1, 67, 93), 21)


def test_image_smaller_than_a_tile_is_one_exact_tile() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)).double().eval()
    image = torch.randn(1, 3, 30, 20, dtype=torch.float64)
    scnn = StreamingCNN(trunk, tile_size=64)
    assert len(scnn.plan(image.shape)) == 1
    assert relative_error(scnn(image), trunk(image).detach()) <= 1e-12


def test_forward_autograd_delivers_exact_gradients_through_loss_backward() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).double().eval()
    head = nn.Conv2d(4, 1, 1).double()
    image = torch.randn(2, 3, 50, 44, dtype=torch.float64, requires_grad=True)
    reference = head(trunk(image)).square().mean()
    reference.backward()
    expected = [p.grad.clone() for p in [*trunk.parameters(), *head.parameters()]] + [image.grad.clone()]
    trunk.zero_grad(), head.zero_grad()
    image.grad = None
    scnn = StreamingCNN(trunk, tile_size=24)
    assert min(scnn.plan(image.shape).grid) > 1
    loss = head(scnn.forward_autograd(image)).square().mean()
    loss.backward()
    actual = [p.grad for p in [*trunk.parameters(), *head.parameters()]] + [image.grad]
    assert relative_error(loss.detach(), reference.detach()) <= 1e-12
    for a, e in zip(actual, expected):
        assert relative_error(a, e) <= 1e-10


def test_gradients_accumulate_on_the_users_own_parameters() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1)
    weight = trunk[0].weight
    scnn = StreamingCNN(trunk, tile_size=16)
    image = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    fmap = scnn(image)
    scnn.backward(image, torch.ones_like(fmap))
    assert scnn.stream_module[0].weight is weight and weight.grad is not None
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, weight.detach())


def test_forward_keeps_no_autograd_graph() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    fmap = StreamingCNN(trunk, tile_size=16)(torch.randn(1, 3, 40, 40))
    assert fmap.grad_fn is None and not fmap.requires_grad
