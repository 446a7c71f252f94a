"""A small trunk for the widget tests (receptive field 12 px, output stride 4)."""

from __future__ import annotations

import pytest
from torch import nn

from tests.conftest import small_trunk


@pytest.fixture
def trunk() -> nn.Module:
    return small_trunk()
