"""A small trunk for the widget tests (receptive field 12 px, output stride 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
    ).eval()
