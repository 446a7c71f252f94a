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


def test_a_tile_covering_the_image_records_no_slices() -> None:
    # a slice of a whole axis is a no-op view, but its backward writes a zero-filled copy of the
    # whole tensor: the graph must not record one
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    graph = TrunkGraph(trunk)
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    y, rows, cols = graph.run(image, (0, 32), (0, 32), graph.sizes(32, 32))
    assert (rows, cols) == ((0, 16), (0, 16))
    assert torch.equal(y, trunk(image))
    nodes = _autograd_nodes(y)
    assert "ConvolutionBackward0" in nodes and not [n for n in nodes if "Slice" in n or "Narrow" in n]


def test_an_inner_tile_slices_only_the_axes_it_cuts() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    graph = TrunkGraph(trunk)
    image = torch.randn(1, 3, 32, 32)
    band = image[:, :, 8:24, :].requires_grad_()  # rows 8..24, every column
    y, rows, cols = graph.run(band, (8, 24), (0, 32), graph.sizes(32, 32))
    assert (rows, cols) == ((9, 23), (0, 32))  # the band's first and last rows lack a neighbour
    assert torch.allclose(y, trunk(image)[:, :, 9:23, :], atol=1e-6)
    assert sum("Slice" in n for n in _autograd_nodes(y)) == 1  # the rows of the output, not the columns
