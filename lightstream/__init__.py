"""lightstream: train CNNs end to end on images far larger than memory, by exact streaming."""

from .core import (
    Box,
    Geometry,
    ImageSource,
    LayerProfile,
    StreamingCNN,
    StreamingError,
    Tile,
    TilePlan,
    TileTooSmallError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

__all__ = [
    "Box", "Geometry", "ImageSource", "LayerProfile", "StreamingCNN", "StreamingError", "Tile",
    "TilePlan", "TileTooSmallError", "UnsupportedLayerError", "__version__",
]
