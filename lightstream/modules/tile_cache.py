"""The tile cache: a small JSON record of how a trunk is streamed at one tile size and dtype.

The streaming geometry is exact integer arithmetic and takes milliseconds, so nothing needs
to be cached for speed. The file is a record a run can be checked against: it names the
trunk's architecture (a fingerprint of its geometry and parameter shapes), the tile size, the
dtype it computes in, the stage setting, and the numbers a data pipeline cares about
(receptive field, output stride, tile stride). It is plain JSON, so loading it never
unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..core import StreamingCNN

__all__ = ["TileCache", "interior_tile_stride"]

logger = logging.getLogger(__name__)
warn_on_rank_zero = rank_zero_only(logger.warning)
"""``logger.warning`` on global rank 0 only: every rank reads the same file, one warning is enough."""

_FORMAT = 1


def interior_tile_stride(engine: StreamingCNN) -> tuple[int, int]:
    """Image pixels between the starts of two neighbouring interior tiles, per axis.

    This is the tile size minus the border each tile loses on both sides, rounded down to the
    output stride: what one more tile adds to the image a plan can cover. It is the
    :attr:`~lightstream.TilePlan.tile_stride` of a plan four tiles long (so that it has interior
    tiles), which is what the engine executes; with stages, of the first stage's plan.
    """
    tile_h, tile_w = engine.tile_size
    return engine.plan((4 * tile_h, 4 * tile_w)).tile_stride


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TileCache:
    """How one trunk streams at one tile size, dtype and stage setting; compared field by field on load."""

    architecture: str
    """Fingerprint of the trunk: its geometry plus the names and shapes of its tensors."""
    tile_size: tuple[int, int]
    dtype: str
    stages: str
    """The engine's ``stages`` setting (``"None"``, ``"auto"`` or the cut indices)."""
    receptive_field: tuple[int, int]
    output_stride: tuple[int, int]
    tile_stride: tuple[int, int]
    geometry_fingerprint: str

    @classmethod
    def of(cls, engine: StreamingCNN, dtype: torch.dtype) -> TileCache:
        """The record of ``engine`` (its trunk and tile size) computing in ``dtype``."""
        geometry = engine.geometry
        digest = hashlib.sha256(geometry.fingerprint.encode())
        digest.update(repr(_tensor_shapes(engine.stream_module)).encode())
        return cls(
            architecture=digest.hexdigest()[:16],
            tile_size=tuple(engine.tile_size),  # type: ignore[arg-type]
            dtype=_dtype_name(dtype),
            stages=str(engine.stages),
            receptive_field=tuple(geometry.receptive_field),  # type: ignore[arg-type]
            output_stride=tuple(geometry.output_stride),  # type: ignore[arg-type]
            tile_stride=interior_tile_stride(engine),
            geometry_fingerprint=geometry.fingerprint,
        )

    @property
    def key(self) -> str:
        """Short hash of what the record is keyed by: architecture, tile size, dtype and stages."""
        text = f"{self.architecture}|{self.tile_size[0]}x{self.tile_size[1]}|{self.dtype}|{self.stages}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: TileCache) -> list[str]:
        """Names of the fields whose values differ from ``other``'s."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def write(self, path: Path) -> None:
        """Write the record as JSON, atomically (a reader never sees half a file)."""
        payload = {"format": _FORMAT, "key": self.key, **dataclasses.asdict(self)}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(payload, file, indent=2)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def read(cls, path: Path) -> TileCache | None:
        """Read a record; ``None`` (with a warning naming the file) when it is not a record of this
        format: not JSON, another format, a field missing or of the wrong type."""
        try:
            payload: Any = json.loads(path.read_text())
            if not isinstance(payload, dict):
                raise ValueError(f"a JSON {type(payload).__name__}, not an object")
            if payload.get("format") != _FORMAT:
                raise ValueError(f"format {payload.get('format')!r}, expected {_FORMAT}")
            values = {f.name: _field_value(f.name, f.type, payload) for f in dataclasses.fields(cls)}
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warn_on_rank_zero("ignoring tile cache %s: not a lightstream tile cache (%s)", path, err)
            return None
        return cls(**values)


def _field_value(name: str, annotation: Any, payload: dict[str, Any]) -> Any:
    """The record's field ``name`` from the JSON ``payload``, checked against its annotation.

    Raises:
        ValueError: the field is missing or of another type (naming it and what was found).
    """
    if name not in payload:
        raise ValueError(f"field {name!r} is missing")
    value = payload[name]
    if annotation == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"field {name!r} is {value!r}, expected a string")
    if annotation == "tuple[int, int]":
        if _is_int_pair(value):
            return tuple(value)
        raise ValueError(f"field {name!r} is {value!r}, expected a list of two integers")
    raise TypeError(f"TileCache.{name} is annotated {annotation!r}, which the reader cannot check")


def _is_int_pair(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _tensor_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a module's parameters and buffers, in registration order."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [(name, tuple(tensor.shape)) for name, tensor in named]
