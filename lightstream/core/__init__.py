"""The streaming math: pure PyTorch, no Lightning and no UI."""

from .engine import StreamingCNN
from .estimate import StepEstimate, TimeModel
from .errors import ImageSizeError, StreamingError, TileTooSmallError, UnsupportedLayerError
from .geometry import Box, Geometry, LayerProfile, Tile, TilePlan
from .graph import TrunkGraph
from .planner import Planner, PlanRequest, StreamPlan
from .record import StaleForwardError
from .source import ImageSource, TensorSource, as_source
from .stages import Stage, StagePlan
from .window import Window

__all__ = [
    "Box", "Geometry", "ImageSizeError", "ImageSource", "LayerProfile", "PlanRequest", "Planner", "Stage", "StagePlan",
    "StaleForwardError", "StepEstimate", "StreamPlan", "StreamingCNN", "StreamingError", "TensorSource", "Tile", "TilePlan", "TileTooSmallError", "TimeModel", "TrunkGraph", "UnsupportedLayerError",
    "Window", "as_source",
]
