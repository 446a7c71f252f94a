"""Lightning layer: the StreamingModule (the reference API) and ready task templates."""

from .classifier import ImageClassifier
from .streaming import StreamingModule
from .tile_cache import TileCache, interior_tile_stride

__all__ = ["ImageClassifier", "StreamingModule", "TileCache", "interior_tile_stride"]
