"""Property-based: random conv/pool stacks, kernels, strides, paddings, dilations, image and tile sizes."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightstream import StreamingCNN
from tests.conftest import relative_error, whole_image_reference


@st.composite
def layers(draw: st.DrawFn, channels: int) -> tuple[nn.Module, int]:
    kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool"]))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "conv":
        d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        out = draw(st.integers(1, 4))
        return nn.Conv2d(channels, out, k, s, p, d, bias=draw(st.booleans())), out
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    ceil = draw(st.booleans())
    if kind == "maxpool":
        return nn.MaxPool2d(k, s, p, ceil_mode=ceil), channels
    return nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=draw(st.booleans())), channels


@st.composite
def trunks(draw: st.DrawFn) -> nn.Sequential:
    channels = draw(st.integers(1, 3))
    modules: list[nn.Module] = []
    current = channels
    for _ in range(draw(st.integers(1, 4))):
        layer, current = draw(layers(current))
        modules.append(layer)
        if draw(st.booleans()):
            modules.append(nn.ReLU())
    trunk = nn.Sequential(*modules).double().eval()
    trunk.in_channels = channels  # type: ignore[assignment]
    return trunk


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(trunk=trunks(), data=st.data())
def test_random_local_stacks_stream_exactly(trunk: nn.Sequential, data: st.DataObject) -> None:
    probe = StreamingCNN(trunk, tile_size=10_000)
    field = probe.geometry.receptive_field
    tile = (data.draw(st.integers(field[0], field[0] + 12)), data.draw(st.integers(field[1], field[1] + 12)))
    height = data.draw(st.integers(tile[0] + 1, tile[0] + 40))
    width = data.draw(st.integers(tile[1] + 1, tile[1] + 40))
    image = torch.randn(data.draw(st.integers(1, 2)), trunk.in_channels, height, width, dtype=torch.float64)
    try:
        expected = trunk(image)
    except RuntimeError:  # the trunk itself rejects this image size (output would be empty)
        return
    if expected.numel() == 0:
        return
    scnn = StreamingCNN(trunk, tile_size=tile, saliency=True)
    plan = scnn.plan(image.shape)
    assume(plan.grid[0] > 1 and plan.grid[1] > 1)  # every example must really tile
    grad = torch.randn_like(expected)
    out, grads, image_grad = whole_image_reference(trunk, image, grad)
    assert relative_error(scnn(image), out) <= 1e-10
    scnn.backward(image, grad)
    for param, g in zip(trunk.parameters(), grads):
        assert relative_error(param.grad, g) <= 1e-10
    assert relative_error(scnn.saliency_map, image_grad) <= 1e-10
