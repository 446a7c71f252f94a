"""Operation families: how an operation on the feature map states its geometry and is cropped.

Streaming is exact only for *local* operations. Each traced call on the feature map is one of:

* a **sliding window** (convolution, pooling): one ``[B, C, H, W]`` input; its geometry is a
  :class:`~lightstream.core.window.Window` per spatial axis, and a tile crops its input to the
  rows and columns its exact outputs read (:attr:`Crop.WINDOW`);
* **position-wise** (pointwise activations and casts, per-pixel normalisation, merges of
  several maps): the output at a pixel reads only that pixel of each input, so a tile crops its
  spatial operands to their common rows and columns (:attr:`Crop.MERGE`);
* a **layout** change (permute, transpose): position-wise, but the spatial axes move;
* **refused**: anything that mixes far positions, with the reason.

A family is a handler that, given an op's *rule* (the op-specific part: read the arguments by
name, check them, return the windows or the new axis order), produces the op's
:class:`OpGeometry` or raises :class:`~lightstream.core.errors.UnsupportedLayerError` naming
the module path. The table of ops (:mod:`lightstream.core.op_table`) pairs each module type,
function and method with its family and rule, so adding an operation is one entry there.

A family with another geometry (resampling by a rational factor, say) is a new
:class:`Family` subclass and :class:`Crop`: its per-axis geometry offers what ``Window``
offers (``stride``, ``out_len``, ``exact_out``, ``needed_in``), so the graph's interval
arithmetic and :class:`~lightstream.core.geometry.Geometry` take it unchanged, and
:meth:`~lightstream.core.graph.TrunkGraph.run` gains the one runner for its crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NoReturn

import torch
import torch.fx as fx
from torch import nn

from .arguments import call_arguments
from .errors import UnsupportedLayerError
from .window import AxisGeometry

__all__ = ["Crop", "Family", "Layout", "Method", "Op", "OpCall", "OpGeometry", "PositionWise", "Refused",
           "SlidingWindow"]


class Crop(Enum):
    """How a tile's spatial operands are cut before an operation runs on them."""

    WINDOW = "window"
    """One input, cut to what the exact outputs read (aligned to the stride); outputs trimmed."""
    MERGE = "merge"
    """Position-wise: every spatial operand cut to the rows and columns all of them hold."""


@dataclass(frozen=True)
class OpGeometry:
    """What streaming needs to know of one operation on the feature map.

    Attributes:
        window: the sliding window along height and width, or ``None`` for position-wise ops.
        dims: positions of the height and width axes in the op's output.
    """

    window: tuple[AxisGeometry, AxisGeometry] | None
    dims: tuple[int, int]


@dataclass(frozen=True)
class Method:
    """Table key of a tensor method (``x.permute(...)`` is ``Method("permute")``)."""

    name: str


@dataclass
class OpCall:
    """One traced call, as an op's rule sees it.

    Attributes:
        node: the fx node.
        path: where it lives, for messages (``layer1.0.conv1``, ``block (add_3)``).
        target: the ``nn.Module`` of a module call, else the function or method name.
        root: the traced trunk (fx resolves module calls in it).
        stub: a Python function naming the call's parameters where torch has no schema.
        example: the trace-time value of an image-independent input node (else ``None``).
        dims: positions of height and width in the call's spatial inputs.
        spatial_inputs: the input nodes that hold (part of) the feature map.
    """

    node: fx.Node
    path: str
    target: Any
    root: nn.Module
    stub: Callable[..., Any] | None = None
    example: Callable[[fx.Node], Any] = lambda node: None
    dims: tuple[int, int] = (2, 3)
    spatial_inputs: Sequence[fx.Node] = ()
    _arguments: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @property
    def module(self) -> nn.Module:
        """The called module (module calls only)."""
        assert isinstance(self.target, nn.Module), f"{self.path} is not a module call"
        return self.target

    def argument(self, name: str, default: Any = None) -> Any:
        """The call's argument ``name`` (its default where the call leaves it out), read by name."""
        if self._arguments is None:
            self._arguments = call_arguments(self.node, self.root, self.stub, self.example)
            if self._arguments is None:
                self.refuse("lightstream could not match its arguments to the operation's signature")
        return self._arguments.get(name, default)

    def refuse(self, reason: str) -> NoReturn:
        """Refuse the call, naming its path and why."""
        raise UnsupportedLayerError(self.path, reason)

    def require_channels_first(self) -> None:
        """Refuse unless channels are at axis 1 (height and width at 2 and 3)."""
        if self.dims != (2, 3):
            self.refuse("it expects channels at axis 1 but gets a permuted map")

    def require_free_axis(self, dim: int, verb: str) -> None:
        """Refuse when axis ``dim`` (of a 4-d map) is a spatial axis."""
        if int(dim) % 4 in self.dims:
            self.refuse(f"it {verb} a spatial axis of the feature map")

    def require_free_trailing(self, count: int, verb: str) -> None:
        """Refuse when the last ``count`` axes include a spatial one (e.g. a Linear over width)."""
        if any(d >= 4 - count for d in self.dims):
            self.refuse(f"it {verb} the spatial axes (e.g. Linear over space); only per-pixel "
                        "(channel) operations are local")

    def require_broadcast_over_space(self) -> None:
        """Refuse an image-independent operand that varies along a spatial axis (it is
        broadcast against the map, so a tile would pair it with the wrong positions)."""
        for node in self.node.all_input_nodes:
            value = None if node in self.spatial_inputs else self.example(node)
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            for d in self.dims:
                axis = d - (4 - value.dim())
                if axis >= 0 and value.shape[axis] != 1:
                    self.refuse("it combines the feature map with a tensor that varies over space "
                                "(e.g. a positional embedding), which is not local")


@dataclass(frozen=True)
class Op:
    """One table entry: how an operation streams.

    Attributes:
        family: its family (the handler that turns ``rule`` into the op's geometry).
        rule: the op-specific part, reading arguments by name: a sliding window returns its
            ``(Window, Window)``, a layout its axis order, a position-wise op only checks.
        signature: a Python stub naming the call's parameters where torch has no schema.
        draws: when a call of it draws random numbers (dropout in training mode), for ops
            that sometimes do; other ops are checked against torch's seeded-operator tags.
        reason: why a refused op is not local, and what to do instead.
        bounded: whether finite inputs always give finite outputs. A tile carries margins of
            values that only its own padding produced (see
            :meth:`~lightstream.core.graph.TrunkGraph.schedule`); they reach only outputs that
            are cropped away, and their gradients are exact zeros, unless an op makes them
            infinite or NaN (``log``, division, ``exp``): such an op's operands are cropped to
            their exact values first.
    """

    family: Family
    rule: Callable[[OpCall], Any] | None = None
    signature: Callable[..., Any] | None = None
    draws: Callable[[OpCall], bool] | None = None
    reason: str = ""
    bounded: bool = True


@dataclass(frozen=True)
class Family:
    """An operation family: the handler of its ops' geometry, and how a tile crops them."""

    name: str
    crop: Crop | None

    def geometry(self, op: Op, call: OpCall) -> OpGeometry:
        """The op's geometry for this call, or an :class:`UnsupportedLayerError`."""
        raise NotImplementedError


@dataclass(frozen=True)
class SlidingWindow(Family):
    """Convolutions and pooling: a window per spatial axis over one ``[B, C, H, W]`` map."""

    crop: Crop | None = Crop.WINDOW

    def geometry(self, op: Op, call: OpCall) -> OpGeometry:
        assert op.rule is not None, f"{self.name} op without a rule"
        windows = op.rule(call)
        source = call.spatial_inputs[0] if len(call.spatial_inputs) == 1 else None
        if call.dims != (2, 3) or source is None or call.argument("input") is not source:
            call.refuse("a convolution or pooling must read one [B, C, H, W] map")
        return OpGeometry(windows, (2, 3))


@dataclass(frozen=True)
class PositionWise(Family):
    """Ops whose output at a pixel reads only that pixel of each input.

    ``broadcast``: whether image-independent operands are checked to be constant over space
    (true for arithmetic; a normalisation's parameters are per channel by its own contract).
    """

    crop: Crop | None = Crop.MERGE
    broadcast: bool = True

    def geometry(self, op: Op, call: OpCall) -> OpGeometry:
        if op.rule is not None:
            op.rule(call)
        if self.broadcast:
            call.require_broadcast_over_space()
        return OpGeometry(None, call.dims)


@dataclass(frozen=True)
class Layout(Family):
    """Axis permutations: position-wise, but height and width move to other axes."""

    crop: Crop | None = Crop.MERGE

    def geometry(self, op: Op, call: OpCall) -> OpGeometry:
        assert op.rule is not None, f"{self.name} op without a rule"
        order = list(op.rule(call))  # output axis i holds input axis order[i]
        return OpGeometry(None, (order.index(call.dims[0]), order.index(call.dims[1])))


@dataclass(frozen=True)
class Refused(Family):
    """Non-local ops: refused, with the entry's reason."""

    crop: Crop | None = None

    def geometry(self, op: Op, call: OpCall) -> OpGeometry:
        call.refuse(op.reason)
