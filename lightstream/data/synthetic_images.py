"""In-memory synthetic images whose label hides in structures only visible at full resolution.

The tutorials and quick experiments need a classification task that (a) runs without any
download, (b) makes images of any size, one at a time, deterministically, and (c) really needs
the full resolution: downsampling the image to fit a conventional network must destroy the
signal. :class:`SyntheticPatternDataset` is such a task:

* every image is a smooth, low-frequency "tissue" background with a little pixel noise, and
  ``patches`` small square spots scattered over it;
* in class-1 images the spots are fine **checkerboards** (period 2 px); in class-0 images they
  are **flat** squares of exactly the same mean colour.

Averaged over 2 x 2 pixels a checkerboard *is* its flat mean, so at half resolution or coarser
the two classes are statistically identical: only a model that sees full-resolution pixels can
tell them apart, while at full resolution a 3 x 3 convolution can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

__all__ = ["PatternSample", "SyntheticPatternDataset"]


@dataclass(frozen=True)
class PatternSample:
    """One image of :class:`SyntheticPatternDataset` with where its spots are.

    Attributes:
        image: float ``[3, H, W]`` in ``[0, 1]``.
        label: 1 if the spots are checkerboards, else 0.
        boxes: ``(top, left, size)`` of every spot, in image pixels.
    """

    image: torch.Tensor
    label: int
    boxes: tuple[tuple[int, int, int], ...]


class SyntheticPatternDataset(Dataset):
    """``n`` images of ``size`` x ``size`` px; the label is in 2-px checkerboards (see module doc).

    Images are made on demand from ``(seed, index)``, so nothing is held in memory and every
    read of an item returns the same pixels. Items are ``(image [3, H, W] float32, label int64)``,
    ready for a ``DataLoader``.

    Args:
        n: number of images.
        size: image side in pixels (an int or ``(height, width)``); at least ``4 * patch``.
        patch: side of a spot in pixels (rounded up to even, so checkerboards average out exactly).
        patches: spots per image.
        contrast: checkerboard amplitude (its squares are ``mean +- contrast``).
        noise: standard deviation of the per-pixel noise.
        positive_fraction: share of class-1 images (labels are shuffled from ``seed``).
        seed: seed of the whole dataset.
        dtype: floating dtype of the images.
    """

    def __init__(
        self,
        n: int,
        size: int | Sequence[int] = 1024,
        *,
        patch: int = 8,
        patches: int = 6,
        contrast: float = 0.25,
        noise: float = 0.02,
        positive_fraction: float = 0.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n = int(n)
        self.size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)  # type: ignore[assignment]
        self.patch = int(patch) + int(patch) % 2
        if min(self.size) < 4 * self.patch:
            raise ValueError(f"images of {self.size} px are too small for spots of {self.patch} px")
        self.patches = int(patches)
        self.contrast = float(contrast)
        self.noise = float(noise)
        self.seed = int(seed)
        self.dtype = dtype
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.zeros(self.n, dtype=torch.int64)
        labels[: round(self.n * positive_fraction)] = 1
        self.labels: torch.Tensor = labels[torch.randperm(self.n, generator=generator)]
        """The label of every item (``int64 [n]``)."""

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.sample(index)
        return sample.image, torch.tensor(sample.label, dtype=torch.int64)

    def sample(self, index: int) -> PatternSample:
        """Item ``index`` with its spot boxes (for plots)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        height, width = self.size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        # Smooth background: a coarse random grid per channel, upsampled bicubically.
        coarse = 0.55 + 0.15 * torch.rand(1, 3, 6, 6, generator=generator)
        image = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        image += self.noise * torch.randn(3, height, width, generator=generator)
        label = int(self.labels[index])
        size = self.patch
        ys = torch.arange(size).view(-1, 1)
        xs = torch.arange(size).view(1, -1)
        checker = ((ys + xs) % 2 * 2 - 1).to(image.dtype)  # +-1, mean exactly 0 over every 2x2 block
        boxes = []
        for _ in range(self.patches):
            # even corners: the checkerboard's 2x2 blocks align with a 2x downsampling grid
            top = 2 * int(torch.randint(size // 2, (height - 2 * size) // 2, (1,), generator=generator))
            left = 2 * int(torch.randint(size // 2, (width - 2 * size) // 2, (1,), generator=generator))
            mean = 0.3 + 0.1 * torch.rand(3, 1, 1, generator=generator)
            spot = mean + (self.contrast * checker if label else 0.0)
            image[:, top:top + size, left:left + size] = spot + self.noise * torch.randn(
                3, size, size, generator=generator)
            boxes.append((top, left, size))
        return PatternSample(image.clamp_(0, 1).to(self.dtype), label, tuple(boxes))
