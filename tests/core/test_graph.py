"""The traced trunk runs a tile with views only where it cuts something."""

from __future__ import annotations

import torch
from torch import nn

from lightstream.core.graph import TrunkGraph


def _autograd_nodes(tensor: torch.Tensor) -> list[str]:
    seen, todo, names = set(), [tensor.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_a_tile_covering_the_image_records_no_crops() -> None:
    # a slice of a whole axis is a no-op view, but its backward writes a zero-filled copy of the
    # whole tensor: the graph must not record one
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    graph = TrunkGraph(trunk)
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = graph.run(image, (0, 32), (0, 32), graph.sizes(32, 32))
    assert out.held == out.exact == ((0, 16), (0, 16))
    assert torch.equal(out.value, trunk(image))
    nodes = _autograd_nodes(out.value)
    assert "ConvolutionBackward0" in nodes and not [n for n in nodes if "Slice" in n or "Pad" in n]


def test_an_inner_tile_carries_its_margins_instead_of_cropping_every_layer() -> None:
    # the band's first and last rows lack a neighbour, so the convolution's outputs there read its
    # padding: they are held but not exact, and nothing is cropped (no recorded crop, no backward copy)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    graph = TrunkGraph(trunk)
    image = torch.randn(1, 3, 64, 32)
    band = image[:, :, 8:40, :].requires_grad_()  # rows 8..40, every column
    out = graph.run(band, (8, 40), (0, 32), graph.sizes(64, 32))
    assert out.held == ((8, 40), (0, 32)) and out.exact == ((10, 38), (0, 32))
    assert torch.allclose(out.exact_value, trunk(image)[:, :, 10:38, :], atol=1e-6)
    assert not [n for n in _autograd_nodes(out.value) if "Slice" in n or "Pad" in n]


def test_margins_are_cropped_once_they_would_exceed_an_eighth_of_the_tile() -> None:
    trunk = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(6)])
    graph = TrunkGraph(trunk)
    sizes = graph.sizes(64, 64)
    schedule = graph.schedule((8, 40), 0, sizes)  # 32 rows: margins of 1 + 1 per layer
    margins = [(h[1] - h[0]) - (e[1] - e[0]) for h, e in zip(schedule.held[1:], schedule.spans[1:])]
    # 6 of 32 rows would exceed 1/8: layer 3 is cropped to its 26 exact rows; then 4 of 26 would
    assert margins == [2, 4, 0, 2, 0, 2]
    image = torch.randn(1, 2, 64, 64, dtype=torch.float64)
    trunk = trunk.double()
    out = graph.run(image[:, :, 8:40].requires_grad_(), (8, 40), (0, 64), sizes)
    assert out.exact == ((14, 34), (0, 64))
    torch.testing.assert_close(out.exact_value, trunk(image)[:, :, 14:34], rtol=0, atol=1e-12)
    # the two crops are views of the convolutions' operands (nothing copied beside what autograd
    # saved), each recorded as one operation whose backward is one zero-padding
    nodes = _autograd_nodes(out.value)
    assert sum("_CropViewBackward" in n for n in nodes) == 2 and not [n for n in nodes if "Slice" in n]


def test_an_op_that_can_make_margins_infinite_gets_exact_operands_and_exact_gradients() -> None:
    class LogTrunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 1, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.log(self.conv1(x)))

    trunk = LogTrunk().double()
    with torch.no_grad():
        trunk.conv1.weight.fill_(1.0)  # a positive image stays positive, but a margin of zeros would not
    graph = TrunkGraph(trunk)
    sizes = graph.sizes(32, 32)
    image = torch.rand(1, 1, 32, 32, dtype=torch.float64) + 0.5
    schedule = graph.schedule((8, 24), 0, sizes)
    log = next(i for i, step in enumerate(graph.steps) if step.target is torch.log)
    assert schedule.held[log] == schedule.spans[log] == (9, 23)
    out = graph.run(image[:, :, 8:24], (8, 24), (0, 32), sizes)
    grads = torch.autograd.grad(out.exact_value.sum(), list(trunk.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


