"""The op table: one entry per operation, arguments read by name, keyword calls streamed exactly."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lightstream import UnsupportedLayerError
from lightstream.core.arguments import call_arguments
from lightstream.core.graph import TrunkGraph
from lightstream.core.op_table import OPS
from lightstream.core.ops import Crop, Method
from lightstream.core.window import Window
from tests.conftest import assert_streaming_exact


class Call(nn.Module):
    """A trunk that is one call on the feature map (after a 1x1 convolution making 4 channels)."""

    def __init__(self, body) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


def test_the_table_has_an_entry_for_every_family() -> None:
    families = {op.family.name for op in OPS.values()}
    assert families == {"convolution", "pooling", "transposed convolution", "upsampling", "pointwise",
                        "normalisation", "merge", "layout", "refused"}
    crops = {op.family.name: op.family.crop for op in OPS.values()}
    assert crops["convolution"] is crops["pooling"] is Crop.WINDOW
    assert crops["transposed convolution"] is crops["upsampling"] is Crop.WINDOW
    assert crops["pointwise"] is crops["merge"] is crops["layout"] is crops["normalisation"] is Crop.MERGE
    assert crops["refused"] is None


@pytest.mark.parametrize(("key", "family"), [
    (nn.Conv2d, "convolution"), (F.conv2d, "convolution"), (nn.MaxPool2d, "pooling"),
    (F.max_pool2d, "pooling"), (torch.max_pool2d, "pooling"), (F.avg_pool2d, "pooling"),
    (nn.GELU, "pointwise"), (torch.relu, "pointwise"), (Method("float"), "pointwise"),
    (F.dropout, "pointwise"), (nn.RReLU, "pointwise"), (nn.modules.batchnorm._BatchNorm, "normalisation"),
    (F.layer_norm, "normalisation"), (nn.Linear, "normalisation"), (nn.PReLU, "normalisation"),
    (operator.add, "merge"), (Method("mul"), "merge"), (torch.cat, "merge"), (Method("permute"), "layout"),
    (torch.transpose, "layout"), (nn.GroupNorm, "refused"),
    (nn.ConvTranspose2d, "transposed convolution"), (F.conv_transpose2d, "transposed convolution"),
    (F.interpolate, "upsampling"), (nn.Upsample, "upsampling"), (nn.PixelShuffle, "upsampling"),
    (nn.PixelUnshuffle, "pooling"), (nn.ConvTranspose3d, "refused"), (torch.mean, "refused"),
])
def test_each_operation_is_registered_under_its_family(key, family: str) -> None:
    assert OPS[key].family.name == family


@pytest.mark.parametrize(("body", "family", "window"), [
    (nn.Conv2d(4, 4, 3, stride=2, padding=1), "convolution", Window(3, 2, 1, 1, 1)),
    (lambda x: F.max_pool2d(x, 3, 2, 1), "pooling", Window(3, 2, 1, 1, 1)),
    (nn.AvgPool2d(2, ceil_mode=True), "pooling", Window(2, 2, 1, 0, 0, True)),
    (nn.SiLU(), "pointwise", None),
    (nn.BatchNorm2d(4).eval(), "normalisation", None),
    (lambda x: x * 2.0, "merge", None),
    (lambda x: x.transpose(2, 3).transpose(3, 2), "layout", None),
])
def test_a_traced_call_becomes_the_step_its_entry_states(body, family: str, window: Window | None) -> None:
    trunk = Call(body if isinstance(body, nn.Module) else _Lambda(body))
    step = TrunkGraph(trunk).steps[-1]
    assert step.family == family
    assert step.window == (None if window is None else (window, window))
    assert step.crop is (Crop.WINDOW if window is not None else Crop.MERGE)


class _Lambda(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def test_arguments_are_read_by_name_whatever_the_call_spelling() -> None:
    class Convs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.conv2d(x, self.weight, None, 2, 1)
            b = F.conv2d(x, self.weight, padding=1, stride=2)
            c = F.conv2d(stride=(2, 2), padding="same", weight=self.weight, input=x)
            return a + b + c.permute(0, 1, 2, 3)

    trunk = Convs()
    graph = fx.Tracer().trace(trunk)
    nodes = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    read = [call_arguments(n, trunk) for n in nodes[:3]]
    assert [(r["stride"], r["padding"]) for r in read] == [(2, 1), (2, 1), ((2, 2), "same")]
    permute = [n for n in nodes if n.target == "permute"][0]
    assert call_arguments(permute, trunk) is None  # Tensor.permute(*dims): no schema binds it ...
    assert call_arguments(permute, trunk, lambda input, *dims: None)["dims"] == (0, 1, 2, 3)  # ... a stub does


class KeywordCalls(nn.Module):
    """Functional calls with keyword arguments in unusual orders, through every supported family."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)
        self.b2 = nn.Parameter(torch.randn(4))
        self.scale, self.shift = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.proj = nn.Parameter(torch.randn(5, 4) * 0.5)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w1, padding=1, stride=2)
        y = F.conv2d(dilation=2, weight=self.w2, padding=(2, 1), bias=self.b2, input=y)
        y = F.max_pool2d(y, kernel_size=3, padding=1, stride=2)
        y = F.avg_pool2d(y, 3, padding=1, ceil_mode=True, stride=1, count_include_pad=False)
        y = F.batch_norm(y, self.mean, self.var, bias=self.shift, weight=self.scale)
        z = F.linear(y.permute(0, 2, 3, 1), weight=self.proj)  # over channels, channels-last
        z = F.layer_norm(z, eps=1e-3, normalized_shape=(5,))
        z = torch.transpose(z, dim1=1, dim0=3).transpose(dim0=2, dim1=3)
        return F.leaky_relu(torch.cat(dim=1, tensors=[y, z]), negative_slope=0.2)


def test_functional_calls_with_keyword_arguments_stream_exactly() -> None:
    trunk = KeywordCalls().double()
    steps = TrunkGraph(trunk).steps
    assert [s.window[0] for s in steps if s.window is not None] == [
        Window(3, 2, 1, 1, 1), Window(3, 1, 2, 2, 2), Window(3, 2, 1, 1, 1), Window(3, 1, 1, 1, 1, True)]
    assert [s.window[1] for s in steps if s.window is not None][1] == Window(3, 1, 2, 1, 1)
    assert_streaming_exact(trunk, torch.randn(2, 3, 90, 78, dtype=torch.float64), 56)


@pytest.mark.parametrize(("body", "why"), [
    (lambda x: F.max_pool2d(x, kernel_size=2, return_indices=True)[0], "return_indices"),
    (lambda x: torch.cat(dim=-1, tensors=[x, x]), "concatenates along a spatial axis"),
    (lambda x: F.layer_norm(x, normalized_shape=(7,)), "normalises over the spatial axes"),
    (lambda x: F.batch_norm(x.transpose(dim0=1, dim1=2), torch.zeros(4), torch.ones(4)), "channels at axis 1"),
    (lambda x: F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True), "training mode"),
], ids=["max-pool-indices", "cat-over-width", "layer-norm-over-space", "batch-norm-permuted", "batch-norm-training"])
def test_keyword_calls_that_are_not_local_are_refused_naming_the_call(body, why: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=rf"layer 'body \(\w+\)': .*{why}"):
        TrunkGraph(Call(_Lambda(body)))
