"""Predict the segmentation of a whole slide tile by tile into a pyramidal label TIFF.

The logit map of a slide does not fit in memory (65536² x 2 classes in float32 is 34 GB) and
neither does its class map at full resolution on many machines, so :func:`predict_segmentation`
takes the trunk's output one tile at a time (:meth:`StreamingCNN.output_tiles`), keeps only its
argmax, and hands it to a :class:`~lightstream.data.SegmentationWriter`, which stores it
compressed and writes the TIFF pyramid at the end. Memory stays at one output tile plus the
writer's few TIFF tiles.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lightstream.core import ImageSource, StreamingCNN
from lightstream.data.overlay import write_overlay_png
from lightstream.data.segmentation_writer import SegmentationWriter
from lightstream.data.slide import Slide

__all__ = ["predict_segmentation"]

logger = logging.getLogger(__name__)


def predict_segmentation(
    model: Any,
    slide: ImageSource | torch.Tensor,
    path: str | Path,
    *,
    overlay: str | Path | None = None,
    classes: list[str] | None = None,
    tile: int = 256,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the class map of ``slide`` as a tiled pyramidal ``uint8`` TIFF that OpenSlide opens.

    Args:
        model: an :class:`~lightstream.modules.ImageSegmenter` (or any module whose
            ``stream_network`` is a :class:`~lightstream.core.StreamingCNN`; it is put in eval
            mode), or a :class:`~lightstream.core.StreamingCNN` whose trunk outputs logits.
        slide: one image, ``[1, C, H, W]``: an opened :class:`~lightstream.data.Slide` (read
            lazily) or another image source or tensor.
        path: the TIFF to write; the map has the trunk's output size (the slide's for a U-Net)
            and, for a slide, its micrometres per pixel times the output stride.
        overlay: also save the slide's thumbnail with the map over it as this PNG (needs a
            :class:`~lightstream.data.Slide`).
        classes: class names, stored in the TIFF's description.
        tile: TIFF tile side (a multiple of 16).
        overwrite: replace existing files (else ``FileExistsError`` before anything runs).
        progress: show a progress bar over the output tiles.

    Returns:
        the TIFF's path.

    Raises:
        TypeError: ``model`` holds no streaming engine, or ``overlay`` is asked for without a Slide.
        ValueError: ``slide`` holds more than one image, or the output has more than 256 classes.
        ImageSizeError: the whole network cannot run on the slide's size (a U-Net's merged maps
            would differ by a pixel); pad or crop it to the size the message suggests.
    """
    engine = _engine(model)
    shape = tuple(slide.shape)
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"predict_segmentation takes one image [1, C, H, W], got shape {list(shape)}: call it "
                         "once per slide")
    if overlay is not None and not isinstance(slide, Slide):
        raise TypeError(f"overlay= needs an opened Slide (its thumbnail is drawn), got {type(slide).__name__}")
    if overlay is not None and Path(overlay).exists() and not overwrite:
        raise FileExistsError(f"{overlay} exists; pass overwrite=True to replace it")
    plan = engine.plan(shape)
    stride = engine.output_stride
    mpp = getattr(slide, "mpp", None)
    map_mpp = mpp * float(stride[0]) if mpp is not None and stride[0] == stride[1] else None
    logger.info("predicting a %dx%d segmentation in %d tiles into %s", *plan.output_size, len(plan.tiles), path)
    with SegmentationWriter(path, plan.output_size, mpp=map_mpp, tile=tile, classes=classes,
                            overwrite=overwrite) as writer, torch.no_grad():
        for logits, rows, cols in tqdm(engine.output_tiles(slide), total=len(plan.tiles), disable=not progress,
                                       desc="segmentation tiles"):
            if logits.shape[1] > 256:
                raise ValueError(f"the trunk outputs {logits.shape[1]} classes; a label TIFF holds at most 256")
            writer.write(slice(*rows), slice(*cols), logits.argmax(1).to(torch.uint8))
    if overlay is not None:
        write_overlay_png(overlay, slide, writer.path)
    return writer.path


def _engine(model: Any) -> StreamingCNN:
    """The streaming engine of ``model``; a Lightning module is put in eval mode."""
    if isinstance(model, StreamingCNN):
        return model
    engine = getattr(model, "stream_network", None)
    if not isinstance(engine, StreamingCNN):
        raise TypeError(f"model must be an ImageSegmenter (a module with a StreamingCNN stream_network) or a "
                        f"StreamingCNN, got {type(model).__name__}")
    model.eval()
    return engine
