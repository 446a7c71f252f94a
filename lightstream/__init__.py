"""lightstream: train CNNs end to end on images far larger than memory, by exact streaming.

The core (``StreamingCNN`` and its geometry) is pure PyTorch. ``StreamingModule`` and
``ImageClassifier``/``ImageSegmenter`` (Lightning) are imported on first use, so ``import lightstream`` stays
light; slides live in :mod:`lightstream.data`, backbones in :mod:`lightstream.models`,
figures in :mod:`lightstream.viz` and notebook widgets in :mod:`lightstream.widgets`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import (
    Box,
    Geometry,
    ImageSizeError,
    ImageSource,
    LayerProfile,
    StaleForwardError,
    StepEstimate,
    StreamingCNN,
    StreamingError,
    Tile,
    TilePlan,
    TileTooSmallError,
    TimeModel,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

_LAZY = {"StreamingModule": "lightstream.modules", "ImageClassifier": "lightstream.modules",
         "ImageSegmenter": "lightstream.modules"}

__all__ = [
    "Box", "Geometry", "ImageClassifier", "ImageSegmenter", "ImageSizeError", "ImageSource", "LayerProfile",
    "StaleForwardError", "StepEstimate", "StreamingCNN",
    "StreamingError", "StreamingModule", "Tile", "TilePlan", "TileTooSmallError", "TimeModel",
    "UnsupportedLayerError", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightstream' has no attribute {name!r}")
