"""A small trunk and its engine for the plot tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from matplotlib.artist import Artist
from matplotlib.figure import Figure

from lightstream import StreamingCNN
from tests.conftest import small_trunk


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
