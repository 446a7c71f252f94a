"""Lightning layer: the StreamingModule (the reference API) and ready task templates."""

from .checkpoint import TrunkGeometryError
from .classifier import ImageClassifier
from .heads import PooledLinearHead, SlideOutput
from .inference import SlidePrediction, predict_slide
from .mil import AttentionMIL, GatedAttentionMIL, MILOutput
from .segmenter import ImageSegmenter, segmentation_metrics
from .streaming import StreamingModule
from .tile_cache import TileCache, interior_tile_stride

__all__ = ["AttentionMIL", "GatedAttentionMIL", "ImageClassifier", "ImageSegmenter", "MILOutput", "PooledLinearHead",
           "SlideOutput", "SlidePrediction", "StreamingModule", "TileCache", "TrunkGeometryError", "interior_tile_stride",
           "predict_slide", "segmentation_metrics"]
