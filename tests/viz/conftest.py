"""A small trunk and its engine for the plot tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from torch import nn

from lightstream import StreamingCNN


def small_trunk() -> nn.Module:
    """Three convolutions and a pooling: receptive field 12 px, output stride 4."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
    ).eval()


@pytest.fixture
def engine() -> StreamingCNN:
    return StreamingCNN(small_trunk(), tile_size=64)


def _artist(figure: Figure, gid: str) -> Artist:
    found = [a for a in figure.axes[0].get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"expected one artist {gid!r}, found {len(found)}"
    return found[0]


@pytest.fixture
def artist() -> Callable[[Figure, str], Artist]:
    """``artist(figure, gid)``: the one artist with ``gid`` in the figure's first Axes."""
    return _artist
