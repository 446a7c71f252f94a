"""Image sources the engine reads tiles from: an in-memory tensor or anything lazy (a slide level)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["ImageSource", "TensorSource", "as_source", "region"]


@runtime_checkable
class ImageSource(Protocol):
    """A ``[B, C, H, W]`` image that can be read one rectangle at a time.

    The engine never asks for the whole image, only for tile rectangles, so a source may
    live on disk (an OpenSlide level) and be read on demand. ``read`` may return any dtype
    (``uint8`` for slides); the engine casts each tile to the trunk's dtype on its device.
    """

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, C, H, W)`` of the full image."""

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        """Return the pixels ``[:, :, rows, cols]`` as a ``[B, C, h, w]`` tensor (any device)."""


class TensorSource:
    """An :class:`ImageSource` over a tensor that is already in memory (CPU or GPU)."""

    def __init__(self, image: torch.Tensor) -> None:
        if image.dim() != 4:
            raise ValueError(f"expected an image of shape [B, C, H, W], got {tuple(image.shape)}")
        self.image = image

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        return region(self.image, rows, cols)


def region(x: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """The view ``x[:, :, rows, cols]`` of a ``[B, C, H, W]`` tensor (unit steps) as one operation,
    where indexing dispatches a slice per axis (each a kernel launch's worth of overhead)."""
    top, bottom, _ = rows.indices(x.shape[2])
    left, right, _ = cols.indices(x.shape[3])
    stride = x.stride()
    return x.as_strided((x.shape[0], x.shape[1], max(0, bottom - top), max(0, right - left)), stride,
                        x.storage_offset() + top * stride[2] + left * stride[3])


def as_source(image: torch.Tensor | ImageSource) -> ImageSource:
    """Wrap a tensor as a :class:`TensorSource`; pass any other :class:`ImageSource` through."""
    if isinstance(image, torch.Tensor):
        return TensorSource(image)
    if isinstance(image, ImageSource):
        return image
    raise TypeError(f"expected a [B, C, H, W] tensor or an ImageSource, got {type(image).__name__}")
