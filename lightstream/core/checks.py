"""Checks at the engine's door: every setting and input is validated where the user gives it.

Each check raises with the offending value and what to pass instead, so a mistake fails at the
call that made it, not as a shape error deep inside a tile or as silently wrong numbers.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["tile_pair", "stage_policy", "stage_memory_setting", "channel_vector", "image_shape",
           "tile_dtype", "input_channels", "tile_batch_setting", "StagePolicy"]

StagePolicy = str | tuple[int, ...] | None
"""``"auto"``, ``None`` (one piece) or the child indices to cut an ``nn.Sequential`` trunk at."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer number of pixels, not {value!r} "
                        f"({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of pixels, not {value}")
    return int(value)


def tile_pair(value: Any, name: str = "tile_size") -> tuple[int, int]:
    """``512`` -> ``(512, 512)``; ``(h, w)`` stays; a tile shape ``(1, C, h, w)`` -> ``(h, w)``.

    Only positive integers are accepted: ``"99"``, ``True``, ``32.7`` and NaN are refused, not
    converted.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Integral, Sequence, torch.Size)):
        raise TypeError(f"{name} must be an int or (height, width) of ints, not {value!r}")
    if isinstance(value, numbers.Integral):
        side = _positive_int(value, name)
        return side, side
    if len(value) not in (2, 4):
        raise ValueError(f"{name} must be an int, (height, width) or (1, C, height, width), got {value!r}")
    return _positive_int(value[-2], f"{name} height"), _positive_int(value[-1], f"{name} width")


def stage_policy(stages: Any, trunk: nn.Module) -> StagePolicy:
    """``"auto"``, ``None`` or sorted, distinct cut indices strictly inside an ``nn.Sequential``."""
    if stages is None or (isinstance(stages, str) and stages == "auto"):
        return stages
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise ValueError(f"stages must be 'auto', None or a list of child indices to cut at, not {stages!r}")
    if not isinstance(trunk, nn.Sequential):
        raise TypeError("explicit stages need an nn.Sequential trunk (cuts are child indices); "
                        f"this trunk is a {type(trunk).__name__}: use stages='auto' or None")
    children = len(trunk)
    cuts = []
    for cut in stages:
        if isinstance(cut, bool) or not isinstance(cut, numbers.Integral):
            raise TypeError(f"stages must hold child indices (ints), not {cut!r}")
        if not 0 < cut < children:
            raise ValueError(f"cannot cut the trunk before child {cut}: it has {children} children, so "
                             f"a cut must lie in 1..{children - 1}")
        cuts.append(int(cut))
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"stages {list(stages)} repeat a cut")
    return tuple(sorted(cuts))


def stage_memory_setting(value: Any) -> int | str:
    """``"auto"`` or a positive number of bytes."""
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"stage_memory must be a number of bytes or 'auto', not {value!r}")
    if value <= 0:
        raise ValueError(f"stage_memory must be a positive number of bytes, not {value}")
    return int(value)


def tile_batch_setting(value: Any) -> int | str:
    """``"auto"`` or a positive number of tiles run as one batch."""
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"tile_batch must be a positive number of tiles or 'auto', not {value!r}")
    return int(value)


def channel_vector(values: Any, name: str, channels: int | None, nonzero: bool = False) -> torch.Tensor:
    """``mean``/``std`` as a flat float vector of one value per input channel (``None`` or empty: none)."""
    if values is None:
        return torch.empty(0)
    dtype = torch.float64 if isinstance(values, torch.Tensor) and values.dtype == torch.float64 else torch.float32
    try:
        vector = torch.as_tensor(values, dtype=dtype).detach().flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a sequence of numbers, one per image channel, not {values!r}") from err
    if channels is not None and vector.numel() not in (0, channels):
        raise ValueError(f"{name} has {vector.numel()} values but the trunk's first convolution reads "
                         f"{channels} channels: give one value per channel")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{name} must be finite, got {vector.tolist()}")
    if nonzero and (vector == 0).any():
        raise ValueError(f"{name} has a zero ({vector.tolist()}): dividing by it gives inf; "
                         "use 1 for channels that need no scaling")
    return vector


def image_shape(shape: Sequence[int], channels: int | None, what: str = "image") -> tuple[int, int, int, int]:
    """A ``(B, C, H, W)`` shape with positive sizes and the trunk's channel count."""
    if len(shape) != 4:
        raise ValueError(f"{what} must have shape (B, C, H, W), got {tuple(shape)} ({len(shape)} dimensions)")
    values = tuple(int(v) for v in shape)
    if min(values) <= 0:
        raise ValueError(f"{what} shape {values} has an empty axis: batch, channels, height and width "
                         "must all be positive")
    if channels is not None and values[1] != channels:
        raise ValueError(f"{what} has {values[1]} channels but the trunk's first convolution reads "
                         f"{channels}")
    return values  # type: ignore[return-value]


def tile_dtype(dtype: torch.dtype, trunk_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tile is cast to: integer images and lossless float casts become ``trunk_dtype``.

    A float image whose dtype the trunk's cannot hold (float64 into a float32 trunk) is refused
    rather than rounded, so nothing is lost silently. A trunk without parameters
    (``trunk_dtype=None``) keeps float images as they are and casts integer ones to the default
    dtype.
    """
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"cannot stream a {dtype} image; give an integer or floating-point image")
    if trunk_dtype is None:
        return dtype if dtype.is_floating_point else torch.get_default_dtype()
    if dtype == trunk_dtype or not dtype.is_floating_point or torch.promote_types(dtype, trunk_dtype) == trunk_dtype:
        return trunk_dtype
    raise TypeError(f"the image is {dtype} but the trunk computes in {trunk_dtype}; casting would lose "
                    f"precision: cast the image (image.to({trunk_dtype})) or the trunk "
                    f"(trunk.to({dtype})) yourself")


def input_channels(trunk: nn.Module) -> int | None:
    """Channels the trunk's first convolution reads (``None`` when there is none to ask)."""
    return next((m.in_channels for m in trunk.modules() if isinstance(m, nn.Conv2d)), None)

