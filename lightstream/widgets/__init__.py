"""Jupyter widgets over :mod:`lightstream.viz`: a tile-size tuner and a training memory monitor.

This is the only part of lightstream that imports ``ipywidgets``. The widgets are thin views:
their state lives in plain objects (:class:`TileTunerModel`, ``MemoryMonitor.history``).
"""

from .memory import MemoryMonitor, in_notebook_kernel
from .model import (
    StepMeasurement,
    TileTunerModel,
    default_tile_sizes,
    stage_profiles,
    streaming_network,
)
from .tuner import TileTuner

__all__ = [
    "MemoryMonitor", "StepMeasurement", "TileTuner", "TileTunerModel", "default_tile_sizes",
    "in_notebook_kernel", "stage_profiles", "streaming_network",
]
