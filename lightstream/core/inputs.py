"""What every tile goes through before the trunk sees it, and the autocast state it ran under."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import channel_vector, tile_dtype

__all__ = ["Autocast", "Normaliser", "NormaliserCache", "TilePreparer"]


@dataclass(frozen=True)
class Autocast:
    """The autocast state a forward ran under, replayed by the backward's recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> Autocast:
        kind = device.type
        if not torch.amp.is_autocast_available(kind):  # "meta" (shape-only runs): nothing to replay
            return cls("cpu", False, torch.get_autocast_dtype("cpu"))
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@dataclass(frozen=True)
class Normaliser:
    """``(x - mean) / std`` with the vectors already on the tiles' device and in their dtype.

    Built once per device, dtype and version of the user's ``mean``/``std`` (a copy from host
    memory per tile would make the CPU wait for the GPU at every tile), so changing them is
    honoured from the next call on.
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None

    @classmethod
    def of(cls, mean: torch.Tensor, std: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Normaliser:
        return cls(*(v.to(device, dtype).view(1, -1, 1, 1) if v.numel() else None for v in (mean, std)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.mean is None else x - self.mean
        return x if self.std is None else x / self.std


class NormaliserCache:
    """The :class:`Normaliser` of the user's ``mean``/``std`` per device and dtype.

    Keyed by the vectors' identity and version counters too, so a user who changes or replaces
    them gets a new one (checked against the trunk's channels again) on the next call.
    """

    def __init__(self, kept: int = 4) -> None:
        self.kept = kept
        self._normalisers: dict[tuple, Normaliser] = {}

    def get(self, mean: torch.Tensor, std: torch.Tensor, channels: int | None, device: torch.device,
            dtype: torch.dtype) -> Normaliser:
        key = (device, dtype, id(mean), mean._version, id(std), std._version)
        if key not in self._normalisers:
            checked = channel_vector(mean, "mean", channels), channel_vector(std, "std", channels, nonzero=True)
            if len(self._normalisers) >= self.kept:
                self._normalisers.pop(next(iter(self._normalisers)))
            self._normalisers[key] = Normaliser.of(*checked, device, dtype)
        return self._normalisers[key]


@dataclass(frozen=True)
class TilePreparer:
    """Moves a raw tile to the trunk's device; an image tile is also cast and normalised.

    Integer images and float images the trunk's dtype holds exactly are cast to it; a lossy
    cast (float64 into a float32 trunk) is refused (:func:`~lightstream.core.checks.tile_dtype`).
    """

    device: torch.device
    dtype: torch.dtype | None
    normalise: Normaliser

    def __call__(self, x: torch.Tensor, first: bool, requires_grad: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(leaf, prepared)``: the leaf is what the input gradient is taken against."""
        leaf = self.on_device(x) if first else x.to(self.device, non_blocking=True)
        leaf = leaf.detach().requires_grad_() if requires_grad else leaf
        return leaf, self.normalise(leaf) if first else leaf

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """An image (tile) on the device, in the dtype the trunk computes in."""
        return x.to(self.device, tile_dtype(x.dtype, self.dtype), non_blocking=True)
