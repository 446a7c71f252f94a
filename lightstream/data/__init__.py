"""Whole-slide-image data layer: lazy slide sources, tissue crops, lazy augmentations, datasets.

>>> from lightstream.data import open_slide, write_synthetic_slide
>>> write_synthetic_slide("demo.tif", size=(32768, 32768), lesions=3, seed=0)   # doctest: +SKIP
>>> slide = open_slide("demo.tif", mpp=1.0)                                      # doctest: +SKIP
>>> slide.shape                                                                   # doctest: +SKIP
(1, 3, 16384, 16384)
"""

from lightstream.data.dataset import (
    SPLITS,
    Augmentation,
    SlideDataset,
    SlideRecord,
    SlideSample,
    collate_single,
    orient,
    read_mask,
    read_slide_table,
    write_slide_table,
)
from lightstream.data.errors import (
    MaskMismatchError,
    SlideError,
    SlideLevelError,
    SlideNotFoundError,
    SlideTableError,
    UnsupportedSlideError,
)
from lightstream.data.geometry import (
    Box,
    clip_box,
    fit_box_to_multiple,
    round_down_to_multiple,
    round_up_to_multiple,
    scale_box,
)
from lightstream.data.heatmap import heatmap_on_thumbnail, reduce_channels, slide_heatmap
from lightstream.data.masks import LabelMask, open_label_mask
from lightstream.data.overlay import LABEL_COLORS, blend_labels, label_colors, labels_on_thumbnail, write_overlay_png
from lightstream.data.segmentation_dataset import SegmentationSample, SegmentationSlideDataset
from lightstream.data.segmentation_predict import predict_segmentation
from lightstream.data.segmentation_writer import SegmentationWriter, label_pyramid_shapes, write_segmentation
from lightstream.data.slide import MPP_TOLERANCE, Slide, open_slide
from lightstream.data.synthetic import Lesion, SyntheticSlide, write_synthetic_dataset, write_synthetic_slide
from lightstream.data.tissue import TissueMask, detect_tissue, mask_box, otsu_threshold, tissue_box, tissue_mask
from lightstream.data.views import (
    ColorJitter,
    ColorJitterView,
    CropView,
    FlipView,
    Rot90View,
    crop_to_multiple,
    pad_to_multiple,
)

__all__ = [
    "LABEL_COLORS",
    "MPP_TOLERANCE",
    "SPLITS",
    "Augmentation",
    "Box",
    "ColorJitter",
    "ColorJitterView",
    "CropView",
    "FlipView",
    "LabelMask",
    "Lesion",
    "MaskMismatchError",
    "Rot90View",
    "SegmentationSample",
    "SegmentationSlideDataset",
    "SegmentationWriter",
    "Slide",
    "SlideDataset",
    "SlideError",
    "SlideLevelError",
    "SlideNotFoundError",
    "SlideRecord",
    "SlideSample",
    "SlideTableError",
    "SyntheticSlide",
    "TissueMask",
    "UnsupportedSlideError",
    "blend_labels",
    "clip_box",
    "collate_single",
    "crop_to_multiple",
    "detect_tissue",
    "fit_box_to_multiple",
    "heatmap_on_thumbnail",
    "label_colors",
    "label_pyramid_shapes",
    "labels_on_thumbnail",
    "mask_box",
    "open_label_mask",
    "open_slide",
    "orient",
    "otsu_threshold",
    "pad_to_multiple",
    "predict_segmentation",
    "read_mask",
    "read_slide_table",
    "reduce_channels",
    "round_down_to_multiple",
    "round_up_to_multiple",
    "scale_box",
    "slide_heatmap",
    "tissue_box",
    "tissue_mask",
    "write_overlay_png",
    "write_segmentation",
    "write_slide_table",
    "write_synthetic_dataset",
    "write_synthetic_slide",
]
