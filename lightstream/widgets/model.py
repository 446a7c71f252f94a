"""State of the tile-size tuner, free of any UI: what :class:`~lightstream.widgets.TileTuner` shows.

Unit tests and scripts drive :class:`TileTunerModel` directly; the widget only renders it.
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from lightstream.core import (
    ImageSource,
    LayerProfile,
    StreamingCNN,
    TilePlan,
    TileTooSmallError,
)
from lightstream.core.checks import tile_pair
from lightstream.core.estimate import StepEstimate
from lightstream.core.memory import (
    RSS_REASON,
    TensorPeak,
    peak_rss,
    process_rss,
    reset_peak_rss,
)
from lightstream.core.stages import StagePlan
from lightstream.viz import thumbnail

__all__ = [
    "StepMeasurement",
    "TileTunerModel",
    "default_tile_sizes",
    "estimate_disagreement",
    "stage_profiles",
    "streaming_network",
]

logger = logging.getLogger(__name__)

_MAX_DEFAULT_TILE = 16384
DISAGREEMENT = 0.25
"""Relative difference between measured and estimated peak past which the tuner says so."""


@dataclass(frozen=True)
class StepMeasurement:
    """One real training step of the streamed trunk (forward and backward) at one tile size.

    Attributes:
        tile_size: tile side in pixels the step ran with.
        seconds: wall time of the step.
        peak_bytes: the most memory held by tensors during the step, above what tensors held
            before it: the quantity :meth:`StreamingCNN.estimate` predicts as ``peak_bytes``
            (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the allocator's events, see
            :class:`~lightstream.core.memory.TensorPeak`).
        rss_bytes: growth of the process's peak RSS during the step (Linux; elsewhere the RSS
            growth after it). Not comparable to the estimate: it also counts allocator caching
            and library pages (:data:`~lightstream.core.memory.RSS_REASON`).
        memory_label: how ``peak_bytes`` was measured, in words.
        device: where the trunk ran.
        backward: whether a backward ran (``False`` when no trunk parameter requires grad).
        tile_runs: how many times a tile (or batch of tiles) ran through a stage, forward and
            recomputed for the backward.
    """

    tile_size: int
    seconds: float
    peak_bytes: int
    rss_bytes: int
    memory_label: str
    device: str
    backward: bool
    tile_runs: int = 0

    @property
    def rss_reason(self) -> str:
        """Why :attr:`rss_bytes` is larger than :attr:`peak_bytes`, in one line."""
        return RSS_REASON


def estimate_disagreement(measured: int, estimated: int) -> str | None:
    """A sentence when a measured tensor peak and its estimate differ by more than 25 %, else ``None``."""
    if estimated <= 0 or abs(measured - estimated) <= DISAGREEMENT * estimated:
        return None
    ratio = measured / estimated
    side = "more" if ratio > 1 else "less"
    return (f"The measured peak is {ratio:.2f}× the estimate ({abs(ratio - 1):.0%} {side}): the estimate "
            "counts the values autograd saves and the stitched maps, so a gap this large means memory "
            "the cost model does not see (a custom operation's buffers, or a different dtype).")


class _StepCancelled(Exception):
    """Raised by the tile counter's hook to stop a measured step at the next tile."""


def streaming_network(model_or_trunk: nn.Module) -> StreamingCNN | None:
    """The :class:`StreamingCNN` inside ``model_or_trunk``, or ``None`` if it is a bare trunk.

    Accepts a ``StreamingCNN`` or any module holding one as ``.stream_network`` (such as a
    ``StreamingModule``).
    """
    network = getattr(model_or_trunk, "stream_network", model_or_trunk)
    return network if isinstance(network, StreamingCNN) else None


def default_tile_sizes(minimum: int, output_stride: int, image_side: int) -> range:
    """Slider options: multiples of ``4 * output_stride`` (at least 16 px) from one step up to
    the image side (at least twice the minimum tile, at most 16384 px).

    The lowest options may be below ``minimum``, so the slider shows where tiles stop working.
    """
    step = max(16, 4 * output_stride)
    top = min(max(image_side, 2 * minimum), _MAX_DEFAULT_TILE)
    return range(step, -(-top // step) * step + 1, step)


class TileTunerModel:
    """Tile plan, geometry profile and step estimate of a trunk on an image, per tile size.

    Args:
        model_or_trunk: a bare trunk (``nn.Module``), a :class:`StreamingCNN`, or a module with a
            ``.stream_network`` attribute holding one (a ``StreamingModule``). The tuner never
            changes it: it plans with its own engine over the same trunk (call :meth:`apply`).
        image: a ``[B, C, H, W]`` or ``[C, H, W]`` tensor; an ``[H, W]``, ``[H, W, C]`` or
            ``[B, C, H, W]`` array; an object with ``.shape == (B, C, H, W)`` and optionally
            ``.thumbnail(max_size)`` and ``.read(rows, cols)`` (a lazy slide, or a crop, flip,
            rotation or colour view of one); or just a size
            ``(H, W)`` (3 channels) or ``(B, C, H, W)``.
        tile_sizes: the tile sides (px) to choose from; default :func:`default_tile_sizes`.
        tile_size: the initial tile side (added to the options if missing); default the given
            engine's current one, or for a bare trunk the smallest option of at least twice the
            minimum tile (the largest option if none is).
        thumbnail_size: longest side of the image thumbnail kept for drawing.
    """

    def __init__(
        self,
        model_or_trunk: nn.Module,
        image: Any,
        tile_sizes: Sequence[int] | None = None,
        *,
        tile_size: int | None = None,
        thumbnail_size: int = 1024,
    ) -> None:
        if tile_size is not None:
            _check_positive_int(tile_size, "tile_size")
        _check_positive_int(thumbnail_size, "thumbnail_size")
        self.target = streaming_network(model_or_trunk)
        self.trunk: nn.Module = self.target.stream_module if self.target is not None else model_or_trunk
        self.stage_options: dict[str, Any] = (
            {"stages": self.target.stages, "stage_memory": self.target.stage_memory}
            if self.target is not None else {})
        """The given engine's ``stages`` and ``stage_memory``: the tuner plans as it will stream."""
        if hasattr(image, "__array_interface__") and not isinstance(image, (torch.Tensor, np.ndarray)):
            image = np.asarray(image)  # a PIL image
        self.image = image
        self.image_shape = _image_shape(image)
        size = self.image_shape[2:]
        minimum = _minimum_tile(self.trunk, self.stage_options)
        self.engine = StreamingCNN(self.trunk, tile_size=minimum, **self.stage_options)
        geometry = self.engine.geometry
        self.minimum_tile_size: int = max(min(minimum[0], size[0]), min(minimum[1], size[1]))
        """The smallest tile side that works for this trunk (or its first stage) and image (px)."""
        options = set(_positive_sides(tile_sizes, "tile_sizes") if tile_sizes is not None else
                      default_tile_sizes(self.minimum_tile_size, max(geometry.output_stride), max(size)))
        if tile_size is None and self.target is not None:
            tile_size = self.target.tile_size[0]
        self._plan_keys: dict[int, tuple] = {}
        self.tile_sizes: list[int] = self._distinct(sorted(options))
        """The tile sides to choose from: one per distinct plan (the smallest side giving it; of
        the sides too small for the trunk, the largest), so every step of a slider changes the plan."""
        if tile_size is None:
            comfortable = [t for t in self.tile_sizes if t >= 2 * self.minimum_tile_size]
            tile_size = comfortable[0] if comfortable else self.tile_sizes[-1]
        else:
            tile_size = self.snap(tile_size)
        self.thumbnail: np.ndarray | None = (thumbnail(image, thumbnail_size)
                                             if not isinstance(image, (tuple, list)) else None)
        self.plan: TilePlan | None = None
        """The tiles over the image (of the first stage when staged)."""
        self.stage_plans: list[StagePlan] = []
        self.estimate: StepEstimate | None = None
        self.profiles: list[list[LayerProfile]] = []
        """Per stage (one when unstaged), the layers' geometry in image px (see :func:`stage_profiles`)."""
        self.warning: str | None = None
        self.measurement: StepMeasurement | None = None
        self._tile_size = 0
        self.tile_size = tile_size

    def plan_key(self, tile_size: int) -> tuple:
        """What the engine would compute at ``tile_size``: per stage its name and tile spans
        (equal keys, equal computation), or ``("invalid", reason)``. Cached per side."""
        side = _square(tile_size)
        if side not in self._plan_keys:
            previous = self.engine.tile_size
            try:
                self.engine.tile_size = (side, side)
                self._plan_keys[side] = tuple((p.stage.name, p.plan.row_spans, p.plan.col_spans)
                                              for p in self.engine.stage_plans(self.image_shape))
            except TileTooSmallError:
                self._plan_keys[side] = ("invalid", "tile too small")
            except ValueError as error:
                self._plan_keys[side] = ("invalid", str(error))
            finally:
                self.engine.tile_size = previous
        return self._plan_keys[side]

    def snap(self, tile_size: int) -> int:
        """The option giving the same plan as ``tile_size``; a side with a plan no option gives is
        added to :attr:`tile_sizes` and returned as it is."""
        side = _square(tile_size)
        if side in self.tile_sizes:
            return side
        key = self.plan_key(side)
        same = [t for t in self.tile_sizes if self.plan_key(t) == key]
        if same:
            return same[0]
        self.tile_sizes = sorted([*self.tile_sizes, side])
        return side

    def _distinct(self, options: list[int]) -> list[int]:
        """``options`` (sorted) with each run of sides giving one plan reduced to one side."""
        kept: list[int] = []
        for side in options:
            key = self.plan_key(side)
            if kept and self.plan_key(kept[-1]) == key:
                if key[0] == "invalid":  # keep the largest too-small side: just below the minimum
                    kept[-1] = side
                continue
            kept.append(side)
        return kept

    @property
    def tile_size(self) -> int:
        """The chosen tile side (px); setting it re-plans (tens of ms for a ResNet-50)."""
        return self._tile_size

    @tile_size.setter
    def tile_size(self, value: int) -> None:
        self._tile_size = _square(value)
        self.plan, self.stage_plans, self.estimate, self.warning = None, [], None, None
        try:
            self.engine.tile_size = (self._tile_size, self._tile_size)
            self.stage_plans = self.engine.stage_plans(self.image_shape)
            self.plan = self.stage_plans[0].plan
            self.estimate = self.engine.estimate(self.image_shape)
        except TileTooSmallError as error:
            self.warning = (f"A tile of {self._tile_size} px is too small for this trunk: the smallest "
                            f"valid tile is {max(error.minimum)} px (one output pixel needs "
                            f"{error.minimum[0]}×{error.minimum[1]} input px, its receptive field).")
        except ValueError as error:
            self.warning = str(error)
        if self.stage_plans:
            self.profiles = stage_profiles(self.stage_plans)
        else:  # no plan: the unstaged geometry still has a profile; a staged one has no stages yet
            self.profiles = [] if self.stage_options else [self.engine.geometry.profile(self._tile_size)]
        logger.debug("tile %d px: %s", self._tile_size, self.warning or f"{len(self.plan)} tiles")

    def apply(self) -> None:
        """Set the chosen tile size on the :class:`StreamingCNN` the tuner was given."""
        if self.target is None:
            raise TypeError("the tuner was given a bare trunk: build "
                            "StreamingCNN(trunk, tile_size=tuner.tile_size)")
        self.target.tile_size = (self._tile_size, self._tile_size)
        logger.info("tile size set to %d px", self._tile_size)

    def measure_step(self, progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> StepMeasurement | None:
        """Run one real forward and backward of the streamed trunk at the chosen tile size.

        Uses the image (or a random one of its shape when only a size, or an object that cannot
        be read, was given) with the engine's normalisation. Gradients are returned by autograd
        and dropped, so the trunk's ``.grad`` is left untouched. Raises ``ValueError`` when the
        tile size is invalid.

        Tiles are counted by a forward pre-hook on the first module of each stage (every run of
        a tile, or batch of tiles, through a stage calls it once; the engine's own loop is left
        as it is). ``progress(done, total)`` is called as each such run starts; when ``cancel`` is
        set the hook raises at the next run, the step unwinds (hooks removed, no gradient kept)
        and ``None`` is returned: the trunk and the tuner stay usable.
        """
        if self.plan is None:
            raise ValueError(self.warning or "no valid plan at this tile size")
        tile = self._tile_size
        engine = StreamingCNN(self.trunk, tile_size=tile, mean=_buffer(self.target, "mean"),
                              std=_buffer(self.target, "std"), **self.stage_options)
        image = self._step_image()
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        device = engine.device
        counter = _TileCounter(engine.stage_plans(self.image_shape), bool(params), progress, cancel,
                               in_memory=isinstance(image, torch.Tensor))
        rss_before = process_rss()
        rss_peak_reset = reset_peak_rss()
        try:
            with counter, TensorPeak(device) as peak:
                start = time.perf_counter()
                fmap = engine.forward_autograd(image)
                if params:
                    torch.autograd.grad(fmap.float().square().mean(), params)
                del fmap
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
        except _StepCancelled:
            logger.info("measuring one step at tile %d px cancelled after %d of %d tile runs", tile,
                        counter.done, counter.total)
            return None
        rss = (peak_rss() if rss_peak_reset else process_rss()) - rss_before
        label = ("tensor peak (torch.cuda.max_memory_allocated)" if device.type == "cuda"
                 else "tensor peak (CPU allocator events)")
        self.measurement = StepMeasurement(tile, seconds, peak.bytes, max(0, rss), label, str(device),
                                           bool(params), counter.done)
        logger.info("measured one step at tile %d px: %.3f s, tensor peak %d bytes, RSS growth %d bytes", tile,
                    seconds, peak.bytes, rss)
        return self.measurement

    def _step_image(self) -> torch.Tensor | ImageSource:
        image = self.image
        if isinstance(image, torch.Tensor):
            return image if image.dim() == 4 else image.unsqueeze(0)
        if isinstance(image, np.ndarray):
            return _array_to_tensor(image)
        if isinstance(image, ImageSource):
            return image
        return torch.rand(self.image_shape)


def _square(value: int | Sequence[int]) -> int:
    """The side of a square tile given as ``side`` or ``(side, side)`` (positive integers only)."""
    height, width = tile_pair(value)
    if height != width:
        raise ValueError(f"the tuner tunes square tiles; got {height}x{width}")
    return height


def stage_profiles(stage_plans: Sequence[StagePlan]) -> list[list[LayerProfile]]:
    """Each stage's :meth:`~lightstream.core.geometry.Geometry.profile` at its tile, in image px.

    A stage's geometry counts pixels of its input map; strides, lost borders and receptive
    fields are multiplied by the stage's input stride, so stages can be drawn on one axis. A
    stage's receptive field counts from its own input (earlier stages' maps are exact).
    """
    profiles = []
    for stage_plan in stage_plans:
        sy, sx = stage_plan.stage.input_stride
        profiles.append([
            LayerProfile(layer.path, (layer.stride[0] * sy, layer.stride[1] * sx),
                         (layer.receptive_field[0] * sy, layer.receptive_field[1] * sx),
                         (layer.lost[0] * sy, layer.lost[1] * sx, layer.lost[2] * sy, layer.lost[3] * sx))
            for layer in stage_plan.stage.geometry.profile(stage_plan.tile_size)
        ])
    return profiles


def _minimum_tile(trunk: nn.Module, stage_options: dict[str, Any]) -> tuple[int, int]:
    """The smallest tile ``StreamingCNN`` accepts for ``trunk`` with these stage options."""
    try:
        StreamingCNN(trunk, tile_size=1, **stage_options)
    except TileTooSmallError as error:
        return error.minimum
    return (1, 1)


def _positive_sides(values: Any, name: str) -> list[int]:
    """``values`` as a non-empty list of positive integer sides (px); anything else is refused, naming ``name``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of tile sides in pixels, got {values!r}")
    sides = list(values)
    if not sides:
        raise ValueError(f"{name} is empty: give at least one tile side in pixels")
    wrong = [v for v in sides if not _is_positive_int(v)]
    if wrong:
        raise ValueError(f"{name} must hold positive integers (pixels); these are not: {wrong}")
    return [int(v) for v in sides]


def _check_positive_int(value: Any, name: str) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer (pixels), got {value!r}")


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def _image_shape(image: Any) -> tuple[int, int, int, int]:
    """``(B, C, H, W)`` of anything :class:`TileTunerModel` accepts as an image, every side positive."""
    shape = _raw_image_shape(image)
    if min(shape) < 1:
        raise ValueError(f"the image's shape (B, C, H, W) must be positive, got {shape}")
    return shape


def _raw_image_shape(image: Any) -> tuple[int, int, int, int]:
    if isinstance(image, (tuple, list)):
        dims = tuple(int(v) for v in image)
        if len(dims) == 2:
            return (1, 3, *dims)
        if len(dims) == 4:
            return dims  # type: ignore[return-value]
        raise ValueError(f"an image size is (H, W) or (B, C, H, W), got {image!r}")
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        height, width = image.shape[:2]
        return 1, (image.shape[2] if image.ndim == 3 else 1), height, width
    if not hasattr(image, "shape"):
        raise TypeError(f"cannot tune for a {type(image).__name__}: give a tensor, an array, a size (H, W) or "
                        "an opened slide (lightstream.data.open_slide)")
    shape = tuple(int(v) for v in image.shape)
    if isinstance(image, torch.Tensor) and len(shape) == 3:
        return (1, *shape)  # type: ignore[return-value]
    if len(shape) != 4:
        raise ValueError(f"expected an image of shape (B, C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``[H, W]`` / ``[H, W, C]`` / ``[B, C, H, W]`` array -> ``[B, C, H, W]`` tensor (no copy)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dim() == 2:
        return tensor[None, None]
    if tensor.dim() == 3:
        return tensor.permute(2, 0, 1).unsqueeze(0)
    if tensor.dim() == 4:
        return tensor
    raise ValueError(f"expected an [H, W], [H, W, C] or [B, C, H, W] array, got shape {array.shape}")


def _buffer(network: StreamingCNN | None, name: str) -> torch.Tensor | None:
    value = getattr(network, name, None) if network is not None else None
    return value if value is not None and value.numel() else None


class _TileCounter:
    """Counts runs of tiles through the stages with forward pre-hooks; reports progress, stops on cancel.

    ``total`` is what the engine runs: each stage's forward batches (larger tiles where it has
    them and the image is in memory, ``in_memory``), and its batches again for the backward, except a stage of one tile that keeps its graph
    (see ``core/execution.py``).
    """

    def __init__(self, stage_plans: Sequence[StagePlan], backward: bool,
                 progress: Callable[[int, int], None] | None, cancel: threading.Event | None,
                 in_memory: bool = True) -> None:
        self.modules = [next(s.target for s in plan.stage.graph.steps if isinstance(s.target, nn.Module))
                        for plan in stage_plans]
        self.total = sum(len(plan.forward_runs(in_memory or index > 0))
                         + (len(plan.batches) if backward and len(plan.plan) > 1 else 0)
                         for index, plan in enumerate(stage_plans))
        self.done = 0
        self.progress, self.cancel = progress, cancel
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        self._handles = [module.register_forward_pre_hook(self._count) for module in self.modules]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _count(self, module: nn.Module, args: Any) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _StepCancelled
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
