"""Plain matplotlib plots of the streaming geometry and of training memory, for scripts and papers.

Every function returns a :class:`matplotlib.figure.Figure` (a new one, not registered with
pyplot: save it with ``fig.savefig``) or draws on the Axes it is given. No widget code here.
"""

from ._axes import format_bytes
from .heatmap import plot_heatmap_overlay
from .memory import MemorySample, plot_memory, plot_memory_by_image_size
from .profile import border_increase, limiting_layer, plot_receptive_profile
from .segmentation import plot_label_overlay
from .tiles import owned_region, plot_tile_grid, thumbnail

__all__ = [
    "MemorySample", "border_increase", "format_bytes", "limiting_layer", "owned_region", "plot_heatmap_overlay",
    "plot_label_overlay", "plot_memory", "plot_memory_by_image_size",
    "plot_receptive_profile", "plot_tile_grid", "thumbnail",
]
