"""Lightning layer: the StreamingModule (the reference API) and ready task templates."""

from .checkpoint import TrunkGeometryError
from .classifier import ImageClassifier
from .inference import SlidePrediction, predict_slide
from .streaming import StreamingModule
from .tile_cache import TileCache, interior_tile_stride

__all__ = ["ImageClassifier", "SlidePrediction", "StreamingModule", "TileCache", "TrunkGeometryError",
           "interior_tile_stride", "predict_slide"]
