"""The trunk's geometry in a checkpoint: recorded on save, checked on load.

Two trunks can have parameters of the same names and shapes and still compute different maps:
a convolution's stride or dilation is not a parameter. Loading one's weights into the other
succeeds, and training resumes on different numbers without a word. So a checkpoint records
the trunk's geometry fingerprint (:attr:`~lightstream.core.geometry.Geometry.fingerprint`: layer
windows and wiring, not the tile size) with its output stride and receptive field, and loading
refuses a trunk whose fingerprint differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..core import StreamingCNN, StreamingError

__all__ = ["CHECKPOINT_KEY", "TrunkGeometryError", "TrunkGeometryRecord", "check_trunk_geometry",
           "record_trunk_geometry"]

CHECKPOINT_KEY = "lightstream_trunk_geometry"
"""The checkpoint entry holding the :class:`TrunkGeometryRecord` (a plain dict)."""


class TrunkGeometryError(StreamingError, ValueError):
    """A checkpoint was saved from a trunk with another geometry than the one loading it."""


@dataclass(frozen=True)
class TrunkGeometryRecord:
    """What a checkpoint records of its trunk's geometry."""

    fingerprint: str
    output_stride: tuple[int, int]
    receptive_field: tuple[int, int]

    @classmethod
    def of(cls, engine: StreamingCNN) -> TrunkGeometryRecord:
        """The record of ``engine``'s trunk."""
        geometry = engine.geometry
        return cls(geometry.fingerprint, tuple(geometry.output_stride),  # type: ignore[arg-type]
                   tuple(geometry.receptive_field))  # type: ignore[arg-type]

    def describe(self) -> str:
        """``output stride 4x4 / receptive field 15x15 (geometry a1b2...)``."""
        (sy, sx), (ry, rx) = self.output_stride, self.receptive_field
        return f"output stride {sy}x{sx} / receptive field {ry}x{rx} (geometry {self.fingerprint})"


def record_trunk_geometry(checkpoint: dict[str, Any], engine: StreamingCNN) -> None:
    """Store ``engine``'s :class:`TrunkGeometryRecord` in ``checkpoint``."""
    checkpoint[CHECKPOINT_KEY] = asdict(TrunkGeometryRecord.of(engine))


def check_trunk_geometry(checkpoint: dict[str, Any], engine: StreamingCNN) -> None:
    """Refuse a checkpoint saved from a trunk of another geometry than ``engine``'s.

    A checkpoint without the record (saved before lightstream recorded it) loads with a warning.

    Raises:
        TrunkGeometryError: the recorded fingerprint differs from this trunk's (or the record is
            malformed); the message describes both trunks.
    """
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        rank_zero_warn("this checkpoint records no trunk geometry (it was saved before lightstream recorded "
                       "it), so it cannot be checked against this trunk: make sure the model is built with "
                       "the trunk it was trained with")
        return
    current = TrunkGeometryRecord.of(engine)
    try:
        stored = TrunkGeometryRecord(str(saved["fingerprint"]), tuple(saved["output_stride"]),
                                     tuple(saved["receptive_field"]))
    except (KeyError, TypeError) as err:
        raise TrunkGeometryError(f"the checkpoint's {CHECKPOINT_KEY!r} entry is malformed ({err!r}): "
                                 f"{saved!r}") from err
    if stored.fingerprint != current.fingerprint:
        raise TrunkGeometryError(
            f"this checkpoint was saved from a trunk with {stored.describe()}; this trunk has "
            f"{current.describe()}. Its weights would load (their shapes may agree) but compute another "
            "map: build the model with the same trunk (layers, strides, dilations, padding) it was trained with")
