"""The streamed trunk as a graph of local operations, traced with ``torch.fx``.

:class:`TrunkGraph` traces a trunk once, proves that every operation is *local* (a sliding
window, or position-wise), and can then run the trunk on any crop of an image so that every
value it returns is exactly the value the whole-image computation has at those positions.
Non-local layers are refused here, naming the module path and why.

Every spatial tensor inside :meth:`TrunkGraph.run` carries the interval of rows and columns
of its layer's full feature map that it holds. A window operation keeps only the outputs whose
inputs are all present (or are the layer's real padding at the image border); an operation on
several spatial tensors first crops them to their common interval. No value ever depends on a
missing neighbour, which is what makes the streamed backward exact without any bookkeeping of
"lost" gradients: a tile's outputs are the same function of the weights as in the whole image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError
from .op_table import lookup, random_draw, resolve
from .ops import Crop, OpCall
from .randomness import SeededDraws, random_reason
from .source import region
from .window import AxisGeometry, Window, WindowCut

__all__ = ["AxisSchedule", "Span", "Step", "TileOutput", "TrunkGraph", "WindowCut", "crop_to", "module_device",
           "parameter_dtype"]

Span = tuple[int, int]
"""A half-open interval ``[lo, hi)`` of rows or columns in one layer's full feature map."""


@dataclass(frozen=True)
class AxisSchedule:
    """Everything :meth:`TrunkGraph.run` does along one axis for one input interval.

    ``spans``: per step, the rows (or columns) of the full map whose values are exact
    (:meth:`TrunkGraph.exact_spans`); ``held``: the rows the step's tensor holds, which may
    extend past them by a margin that only the tile's own padding produced (see
    :meth:`TrunkGraph.schedule`); ``cuts``: per window step, its :class:`WindowCut` (``None``
    elsewhere); ``inputs``: per step, the spatial steps it reads.
    """

    spans: tuple[Span, ...]
    held: tuple[Span, ...]
    cuts: tuple[WindowCut | None, ...]
    inputs: tuple[tuple[int, ...], ...]

    @property
    def shape_key(self) -> tuple:
        """The schedule with every absolute position removed.

        :meth:`TrunkGraph.run` reads the held spans only through these differences (narrow
        offsets and lengths, pads, merge crops), so two inputs with equal keys on both axes run
        the same operations on tensors of the same shapes: stacked on the batch axis they run once.
        """
        key: list[tuple] = []
        for held, cut, inputs in zip(self.held, self.cuts, self.inputs):
            if cut is not None:
                key.append((cut.start, cut.length, cut.pad, cut.first, cut.out[1] - cut.out[0]))
            else:
                key.append((held[1] - held[0], *(held[0] - self.held[i][0] for i in inputs)))
        return tuple(key)


MAX_MARGIN = 0.125
"""The largest fraction of a tile's rows (or columns) a window step may carry as margin before
its output is cropped to the exact values (a margin saves the crop's operations, and costs
computing it in the following layers)."""


@dataclass
class Step:
    """One operation of the traced trunk.

    Attributes:
        name: the fx node name.
        path: where the operation lives, for messages and plots (``layer1.0.conv1``, ``add_3``).
        spatial: ``False`` for values that do not depend on the image (parameters, constants).
        window: the sliding windows along height and width, for convolutions and pooling.
        dims: positions of the height and width axes in this step's output tensor.
        inputs: indices of the spatial steps this step reads.
        target: what runs: the module, the function or the method name.
        family: the op family that accepted it (:mod:`lightstream.core.op_table`); ``""`` for
            the input and image-independent steps.
        crop: how a tile's operands are cut before it runs.
        bounded: whether finite operands give finite results (:attr:`~lightstream.core.ops.Op.bounded`):
            only then may its operands carry margins.
    """

    name: str
    path: str
    node: fx.Node
    spatial: bool
    window: tuple[AxisGeometry, AxisGeometry] | None = None
    dims: tuple[int, int] = (2, 3)
    inputs: tuple[int, ...] = ()
    target: Any = None
    family: str = ""
    crop: Crop = Crop.MERGE
    bounded: bool = True


def _node_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        owner = list(stack.keys())[-1]
        owner = stack[owner][0] if isinstance(stack[owner], tuple) else owner
        return f"{owner} ({node.name})" if owner else node.name
    return node.name


class TrunkGraph:
    """A trunk traced into local steps, runnable on any crop of an image.

    Args:
        trunk: the convolutional trunk, an ``nn.Module`` taking one ``[B, C, H, W]`` tensor and
            returning one ``[B, C', H', W']`` feature map. Its modules and parameters are used
            as they are (no copies), so gradients land on the user's own parameters.

    Raises:
        UnsupportedLayerError: naming the first non-local operation and why it is not local.
    """

    def __init__(self, trunk: nn.Module) -> None:
        self.trunk = trunk
        try:
            graph = fx.Tracer().trace(trunk)
        except Exception as err:  # fx raises many types for untraceable code
            raise UnsupportedLayerError(
                type(trunk).__name__,
                f"torch.fx could not trace it ({type(err).__name__}: {err}); streaming needs a trunk "
                "without data-dependent Python control flow",
            ) from err
        self.steps: list[Step] = []
        self._index: dict[fx.Node, int] = {}
        self._modules = dict(trunk.named_modules())
        self._examples: dict[fx.Node, Any] = {}
        self.output = -1
        for node in graph.nodes:
            self._add(node)
        if self.output < 0:
            raise UnsupportedLayerError(type(trunk).__name__, "the trunk returns nothing")
        self.window_steps = [i for i, s in enumerate(self.steps) if s.window is not None]
        # Liveness: after step i has run, the values whose last reader it was are dropped, so a
        # tile holds only what is still to be read (and what autograd saved), not every output.
        self._released_after: list[list[int]] = [[] for _ in self.steps]
        for index, step in enumerate(self.steps):
            if index != self.output:
                readers = [self._index[user] for user in step.node.users if user in self._index]
                self._released_after[max(readers, default=index)].append(index)

    # ------------------------------------------------------------------ tracing and validation
    def _refuse_random_draw(self, node: fx.Node) -> None:
        """Refuse a call that draws random numbers (see :mod:`lightstream.core.randomness`)."""
        if node.op in ("call_module", "call_function", "call_method"):
            target, op = lookup(node, self._modules)
            call = OpCall(node=node, path=_node_path(node), target=target, root=self.trunk,
                          stub=op.signature if op is not None else None)
            reason = random_draw(call, op)
            if reason is not None:
                call.refuse(reason)

    def _add(self, node: fx.Node) -> None:
        self._refuse_random_draw(node)
        spatial_inputs = [n for n in node.all_input_nodes if self.steps[self._index[n]].spatial]
        path = _node_path(node)
        if node.op == "placeholder":
            if any(s.spatial for s in self.steps):
                raise UnsupportedLayerError(path, "the trunk must take exactly one input, the image")
            step = Step(name=node.name, path="input", node=node, spatial=True)
        elif node.op == "output":
            self._set_output(node, path)
            return
        elif not spatial_inputs:
            step = Step(name=node.name, path=path, node=node, spatial=False, target=node.target)
            self._examples[node] = self._evaluate_static(node, path)
        else:
            try:
                step = self._classify(node, path, spatial_inputs)
            except UnsupportedLayerError:
                for user in node.users:  # torch.randn(x.shape): the draw is the problem, not the shape
                    self._refuse_random_draw(user)
                raise
        self._index[node] = len(self.steps)
        self.steps.append(step)

    def _set_output(self, node: fx.Node, path: str) -> None:
        value = node.args[0]
        if not isinstance(value, fx.Node) or not self.steps[self._index[value]].spatial:
            raise UnsupportedLayerError(path, "the trunk must return a single feature map tensor")
        if self.steps[self._index[value]].dims != (2, 3):
            raise UnsupportedLayerError(path, "the trunk must return a [B, C, H, W] feature map")
        self.output = self._index[value]

    def _evaluate_static(self, node: fx.Node, path: str) -> Any:
        """Evaluate an image-independent step once, watching for random draws the name check
        cannot see (inside a Python function fx did not trace into)."""
        with torch.no_grad(), SeededDraws() as draws:
            value = self._call(node, node.target, lambda n: self._examples[n])
        if draws.drawn:
            raise UnsupportedLayerError(path, random_reason(", ".join(sorted(set(draws.drawn)))))
        return value

    def _classify(self, node: fx.Node, path: str, spatial_inputs: list[fx.Node]) -> Step:
        """The step of a call on the feature map, as its entry in the op table states it."""
        inputs = [self._index[n] for n in spatial_inputs]
        dims = {self.steps[i].dims for i in inputs}
        if len(dims) > 1:
            raise UnsupportedLayerError(path, "it combines feature maps with different axis orders")
        target, op = lookup(node, self._modules)
        call = OpCall(node=node, path=path, target=target, root=self.trunk,
                      stub=op.signature if op is not None else None, example=self._examples.get,
                      dims=dims.pop(), spatial_inputs=spatial_inputs)
        geometry = resolve(call, op)
        assert op is not None and op.family.crop is not None, "resolve refuses ops outside the table"
        return Step(name=node.name, path=path, node=node, spatial=True, window=geometry.window,
                    dims=geometry.dims, inputs=tuple(inputs), target=target, family=op.family.name,
                    crop=op.family.crop, bounded=op.bounded)

    def static_value(self, node: fx.Node) -> Any:
        """An image-independent step's value as evaluated at trace time (``None`` for others)."""
        return self._examples.get(node)

    # ------------------------------------------------------------------ execution
    def _call(self, node: fx.Node, target: Any, value: Callable[[fx.Node], Any], hooks: bool = True) -> Any:
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "get_attr":
            obj: Any = self.trunk
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_module":
            module = target if isinstance(target, nn.Module) else self._modules[str(target)]
            return module(*args, **kwargs) if hooks else module.forward(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Full feature-map size ``(rows, cols)`` of every spatial step for an image of this size."""
        out: list[tuple[int, int]] = []
        for step in self.steps:
            if not step.spatial:
                out.append((0, 0))
            elif step.window is not None:
                ny, nx = out[step.inputs[0]]
                out.append((step.window[0].out_len(ny), step.window[1].out_len(nx)))
            elif step.inputs:
                out.append(out[step.inputs[0]])
            else:
                out.append((height, width))
        return out

    def unequal_merge(self, sizes: Sequence[tuple[int, int]], axis: int | None = None) -> Step | None:
        """The first step that merges maps of different sizes (along ``axis``, or either), if any."""
        axes = (0, 1) if axis is None else (axis,)
        for step in self.steps:
            if step.spatial and step.window is None and len(step.inputs) > 1:
                if any(len({sizes[i][a] for i in step.inputs}) > 1 for a in axes):
                    return step
        return None

    def exact_spans(self, span: Span, axis: int, sizes: Sequence[tuple[int, int]]) -> list[Span]:
        """Per step, the exact interval computed along ``axis`` from input interval ``span``."""
        out: list[Span] = []
        for step in self.steps:
            if not step.spatial:
                out.append((0, 0))
            elif step.window is not None:
                source = step.inputs[0]
                out.append(step.window[axis].exact_out(*out[source], sizes[source][axis]))
            elif step.inputs:
                out.append((max(out[i][0] for i in step.inputs), min(out[i][1] for i in step.inputs)))
            else:
                out.append(span)
        return out

    def schedule(self, span: Span, axis: int, sizes: Sequence[tuple[int, int]]) -> AxisSchedule:
        """How :meth:`run` cuts every step along ``axis`` for input interval ``span``.

        A tile's convolution or pooling runs on everything its operand holds, with the layer's
        padding, and keeps all of its outputs: the outputs next to a cut edge read the padding
        instead of the neighbouring tile's pixels and are not exact, but they only ever reach
        outputs that are not exact either (and are cropped away in the end), so their gradients
        are exact zeros. Not cropping them saves two crops per layer and their zero-filling
        backward copies. A step's operands are cropped to their exact values when its margin
        would exceed :data:`MAX_MARGIN` of what it holds, before an op that is not
        :attr:`~Step.bounded`, and for resampling (whose cut is computed from exact values).
        """
        exact = self.exact_spans(span, axis, sizes)
        held: list[Span] = []
        cuts: list[WindowCut | None] = []
        for index, step in enumerate(self.steps):
            cut = None
            if not step.spatial:
                have = (0, 0)
            elif step.window is not None:
                source = step.inputs[0]
                cut = _margin_cut(step.window[axis], held[source], exact[source], exact[index],
                                  sizes[source][axis], sizes[index][axis])
                have = cut.out
            elif step.inputs:
                spans = held if step.bounded else exact
                have = (max(spans[i][0] for i in step.inputs), min(spans[i][1] for i in step.inputs))
            else:
                have = span
            held.append(have)
            cuts.append(cut)
        inputs = tuple(step.inputs if step.spatial else () for step in self.steps)
        return AxisSchedule(tuple(exact), tuple(held), tuple(cuts), inputs)

    def needed_span(self, span: Span, axis: int, sizes: Sequence[tuple[int, int]],
                    at: int | None = None) -> Span:
        """The input interval along ``axis`` that interval ``span`` of step ``at`` depends on.

        ``at`` defaults to the trunk's output.
        """
        at = self.output if at is None else at
        need: list[Span | None] = [None] * len(self.steps)
        need[at] = span
        for index in range(at, -1, -1):
            step, wanted = self.steps[index], need[index]
            if wanted is None or not step.inputs:
                continue
            if step.window is not None:
                source = step.inputs[0]
                wanted = step.window[axis].needed_in(*wanted, sizes[source][axis])
            for source in step.inputs:
                have = need[source]
                need[source] = wanted if have is None else (min(have[0], wanted[0]), max(have[1], wanted[1]))
        return need[0] if need[0] is not None else span

    def run(self, tile: torch.Tensor, rows: Span, cols: Span, sizes: Sequence[tuple[int, int]],
            observe: Callable[[int, torch.Tensor], None] | None = None) -> TileOutput:
        """Run the trunk on ``tile`` (image rows ``rows`` and columns ``cols``).

        Returns the output tensor with the rows and columns of the full output map it holds and
        those of them that are exact (every value there equals the whole-image computation).
        ``observe(step_index, tensor)`` is called with every spatial step's result; such a
        shape probe skips the modules' forward hooks (users' hooks see only real passes).
        """
        hooks = observe is None
        values: list[Any] = [None] * len(self.steps)
        axes = (self.schedule(rows, 0, sizes), self.schedule(cols, 1, sizes))
        held = list(zip(axes[0].held, axes[1].held))

        def lookup(n: fx.Node) -> Any:
            return values[self._index[n]]

        for index, step in enumerate(self.steps):
            if not step.spatial:
                values[index] = self._call(step.node, step.target, lookup, hooks)
            elif not step.inputs:
                values[index] = tile
            else:
                if step.crop is Crop.WINDOW:
                    cuts = (axes[0].cuts[index], axes[1].cuts[index])
                    values[index] = self._run_window(step, values[step.inputs[0]], cuts, lookup, hooks)  # type: ignore[arg-type]
                else:
                    values[index] = self._run_merged(step, values, held, held[index], hooks)
                if observe is not None:
                    observe(index, values[index])
            for done in self._released_after[index]:
                values[done] = None
        out = self.output
        return TileOutput(values[out], held[out], (axes[0].spans[out], axes[1].spans[out]))

    def _run_merged(self, step: Step, values: list[Any], spans: list[tuple[Span, Span]], box: tuple[Span, Span],
                    hooks: bool) -> Any:
        """A position-wise step: its spatial operands cropped to their common rows and columns ``box``."""
        cropped = {i: crop_to(values[i], spans[i], box, self.steps[i].dims) for i in step.inputs}

        def value(n: fx.Node) -> Any:
            i = self._index[n]
            return cropped[i] if i in cropped else values[i]

        return self._call(step.node, step.target, value, hooks)

    def _run_window(self, step: Step, x: torch.Tensor, cuts: tuple[WindowCut, WindowCut],
                    lookup: Callable[[fx.Node], Any], hooks: bool) -> torch.Tensor:
        rows, cols = cuts
        pads = [(rows.pad - rows.start, rows.start + rows.length - x.shape[2]),
                (cols.pad - cols.start, cols.start + cols.length - x.shape[3])]
        # A crop of the operand is a view: the window op saves what it reads for its backward,
        # and a copy would be saved beside the operand that the previous op saved.
        if rows.pad or cols.pad:
            x = _pad(x, (2, 3), pads)
        elif any(before or after for before, after in pads):
            x = _CropView.apply(x, pads)
        source = self.steps[step.inputs[0]].node
        y = self._call(step.node, step.target, lambda n: x if n is source else lookup(n), hooks)
        return _pad(y, (2, 3), [(-rows.first, rows.first + rows.out[1] - rows.out[0] - y.shape[2]),
                                (-cols.first, cols.first + cols.out[1] - cols.out[0] - y.shape[3])])


@dataclass(frozen=True)
class TileOutput:
    """What :meth:`TrunkGraph.run` returns: the output, the ``(rows, cols)`` of the full output
    map it holds, and the ``(rows, cols)`` of those whose values are exact."""

    value: torch.Tensor
    held: tuple[Span, Span]
    exact: tuple[Span, Span]

    @property
    def exact_value(self) -> torch.Tensor:
        """The output cropped to its exact rows and columns."""
        return crop_to(self.value, self.held, self.exact)


def _margin_cut(window: AxisGeometry, held: Span, exact: Span, exact_out: Span, n: int, m: int) -> WindowCut:
    """How a window step runs on an operand holding ``held`` (exact on ``exact``) of ``n``
    positions: on all of it, keeping the margins, unless they would grow past :data:`MAX_MARGIN`
    or the window is not a plain :class:`~lightstream.core.window.Window` (then cropped to
    ``exact_out``, its exact outputs, of ``m``)."""
    def eager() -> WindowCut:
        cut = window.cut(*exact, n)
        return WindowCut(cut.start + exact[0] - held[0], cut.length, cut.pad, cut.first, cut.out)

    if not isinstance(window, Window) or exact_out[1] <= exact_out[0]:
        return eager()
    stride, (lo, hi) = window.stride, held
    need = window.needed_in(*exact_out, n)
    aligned_up = -(-lo // stride) * stride
    # Output j of the op then reads its input from t0 (a multiple of the stride): it is output
    # t0 / stride + j of the full map. Drop rows up to the next multiple if the exact outputs do
    # not read them, else pad rows before the operand.
    t0 = aligned_up if aligned_up <= need[0] else lo - lo % stride
    start, pad = max(0, t0 - lo), max(0, lo - t0)
    length = hi - lo - start
    outputs = window.out_len(length + pad)
    if window.whole_windows:  # drop the rows no window reads
        length = (outputs - 1) * stride + window.extent - pad
    out_lo = t0 // stride
    out_hi = min(m, out_lo + outputs)
    margin = (out_hi - out_lo) - (exact_out[1] - exact_out[0])
    if out_lo > exact_out[0] or out_hi < exact_out[1] or margin > MAX_MARGIN * (out_hi - out_lo):
        return eager()
    return WindowCut(start, length, pad, 0, (out_lo, out_hi))


def crop_to(x: torch.Tensor, have: tuple[Span, Span], want: tuple[Span, Span], dims: tuple[int, int] = (2, 3)
            ) -> torch.Tensor:
    """Cut ``x``, which holds rows and columns ``have`` of a map, down to ``want`` (``want`` within
    ``have``): a view when autograd records nothing (the forward's tiles), else one ``F.pad``."""
    if have == want:
        return x
    if not torch.is_grad_enabled() and dims == (2, 3):
        return region(x, slice(want[0][0] - have[0][0], want[0][1] - have[0][0]),
                      slice(want[1][0] - have[1][0], want[1][1] - have[1][0]))
    return _pad(x, dims, [(have[a][0] - want[a][0], want[a][1] - have[a][1]) for a in range(2)])


class _CropView(torch.autograd.Function):
    """Rows and columns of a ``[B, C, H, W]`` tensor cut by ``pads`` (``(before, after)`` per axis,
    none positive) as one view, whose backward is one zero-padding op (a crop's recorded slices
    would write a zero-filled copy of the whole tensor per axis). Only for an operand that no
    later op changes in place: here, the input of a window op."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
        (top, bottom), (left, right) = pads
        ctx.flat = (-left, -right, -top, -bottom)
        return region(x, slice(-top, x.shape[2] + bottom), slice(-left, x.shape[3] + right))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.pad(grad, ctx.flat), None


def _pad(x: torch.Tensor, dims: tuple[int, int], pads: list[tuple[int, int]]) -> torch.Tensor:
    """``x`` padded with zeros (positive) or cropped (negative) by ``(before, after)`` along each
    of ``dims``, in one operation (whose backward is one operation too: a crop's recorded slices
    would write a zero-filled copy of the whole tensor per axis); ``x`` itself when all are 0."""
    if not any(before or after for before, after in pads):
        return x
    first = min(dims)
    flat = [0] * (2 * (x.dim() - first))
    for dim, (before, after) in zip(dims, pads):
        offset = 2 * (x.dim() - 1 - dim)
        flat[offset], flat[offset + 1] = before, after
    return F.pad(x, flat)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (or, without any, its buffers) live; the CPU for neither."""
    return next((t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu"))


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (the default dtype without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
