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
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError
from .window import Window

__all__ = ["TrunkGraph", "Step", "Span", "crop_to", "module_device", "parameter_dtype"]

Span = tuple[int, int]
"""A half-open interval ``[lo, hi)`` of rows or columns in one layer's full feature map."""

_INPLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "relu_": "relu",
                    "clamp_": "clamp", "sigmoid_": "sigmoid", "tanh_": "tanh"}

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.Identity, nn.LocalResponseNorm,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh,
    torch.exp, torch.log, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip,
    torch.erf, torch.neg, operator.neg, operator.pos, torch.pow, operator.pow,
}
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.maximum, torch.minimum, torch.where,
}
_POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clip", "sqrt", "square", "pow",
    "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as",
    "add", "sub", "mul", "div",
}
_NONLOCAL_MODULES: dict[tuple[type[nn.Module], ...], str] = {
    (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
     nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
        "adaptive/global pooling combines the whole feature map; end the trunk before it and "
        "apply it in the head, on the stitched feature map",
    (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        "it normalises with statistics over all positions of the image; use BatchNorm in eval "
        "mode, a channel LayerNorm, or move it to the head",
    (nn.MultiheadAttention,): "attention mixes all positions of the feature map",
    (nn.Flatten, nn.Unflatten): "it reshapes the spatial axes, so positions no longer stay apart",
    (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle,
     nn.PixelUnshuffle, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        "it changes the spatial grid in a way lightstream does not stream (only convolutions "
        "and pooling are supported)",
}
_NONLOCAL_FUNCTIONS: dict[Any, str] = {
    F.adaptive_avg_pool2d: _NONLOCAL_MODULES[(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                               nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                                               nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)],
    F.group_norm: "it normalises with statistics over all positions of the image",
    F.instance_norm: "it normalises with statistics over all positions of the image",
    F.interpolate: "resampling changes the spatial grid in a way lightstream does not stream",
    torch.flatten: "it reshapes the spatial axes, so positions no longer stay apart",
    torch.mean: "a reduction over the feature map is global; do it in the head",
    torch.sum: "a reduction over the feature map is global; do it in the head",
}


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
    """

    name: str
    path: str
    node: fx.Node
    spatial: bool
    window: tuple[Window, Window] | None = None
    dims: tuple[int, int] = (2, 3)
    inputs: tuple[int, ...] = ()
    target: Any = None


def _node_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        owner = list(stack.keys())[-1]
        owner = stack[owner][0] if isinstance(stack[owner], tuple) else owner
        return f"{owner} ({node.name})" if owner else node.name
    return node.name


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _conv_windows(kernel: Any, stride: Any, padding: Any, dilation: Any) -> tuple[Window, Window]:
    k, s, d = _pair(kernel), _pair(stride), _pair(dilation)
    windows = []
    for axis in range(2):
        if padding == "valid":
            before = after = 0
        elif padding == "same":
            total = d[axis] * (k[axis] - 1)
            before, after = total // 2, total - total // 2
        else:
            before = after = _pair(padding)[axis]
        windows.append(Window(k[axis], s[axis], d[axis], before, after))
    return windows[0], windows[1]


def _pool_windows(kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool
                  ) -> tuple[Window, Window]:
    k = _pair(kernel)
    s = _pair(stride) if stride not in (None, (), []) else k
    p, d = _pair(padding), _pair(dilation)
    return tuple(Window(k[a], s[a], d[a], p[a], p[a], bool(ceil_mode)) for a in range(2))  # type: ignore[return-value]


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
    def _add(self, node: fx.Node) -> None:
        spatial_inputs = [n for n in node.all_input_nodes if self.steps[self._index[n]].spatial]
        path = _node_path(node)
        if node.op == "placeholder":
            if any(s.spatial for s in self.steps):
                raise UnsupportedLayerError(path, "the trunk must take exactly one input, the image")
            step = Step(node.name, "input", node, spatial=True)
        elif node.op == "output":
            value = node.args[0]
            if not isinstance(value, fx.Node) or not self.steps[self._index[value]].spatial:
                raise UnsupportedLayerError(path, "the trunk must return a single feature map tensor")
            if self.steps[self._index[value]].dims != (2, 3):
                raise UnsupportedLayerError(path, "the trunk must return a [B, C, H, W] feature map")
            self.output = self._index[value]
            return
        elif not spatial_inputs:
            step = Step(node.name, path, node, spatial=False, target=node.target)
            self._examples[node] = self._evaluate_static(node)
        else:
            step = self._classify(node, path, [self._index[n] for n in spatial_inputs])
        self._index[node] = len(self.steps)
        self.steps.append(step)

    def _evaluate_static(self, node: fx.Node) -> Any:
        with torch.no_grad():
            return self._call(node, node.target, lambda n: self._examples[n])

    def _classify(self, node: fx.Node, path: str, inputs: list[int]) -> Step:
        dims = {self.steps[i].dims for i in inputs}
        if len(dims) > 1:
            raise UnsupportedLayerError(path, "it combines feature maps with different axis orders")
        (hw,) = dims
        target = node.target
        if node.op == "call_module":
            return self._classify_module(node, path, inputs, hw, self._modules[str(target)])
        if node.op == "call_function":
            target = _INPLACE.get(target, target)
            if target in _NONLOCAL_FUNCTIONS:
                raise UnsupportedLayerError(path, _NONLOCAL_FUNCTIONS[target])
            if target in (F.conv2d, torch.conv2d):
                weight = self._examples.get(_arg(node, 1, "weight", None))
                if weight is None:
                    raise UnsupportedLayerError(path, "the convolution weight depends on the image")
                window = _conv_windows(tuple(weight.shape[-2:]), _arg(node, 3, "stride", 1),
                                       _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1))
                return self._window_step(node, path, inputs, hw, window, target)
            if target in (F.max_pool2d, torch.max_pool2d):
                if _arg(node, 6, "return_indices", False):
                    raise UnsupportedLayerError(path, "max pooling with return_indices is not supported")
                window = _pool_windows(_arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None),
                                       _arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1),
                                       _arg(node, 5, "ceil_mode", False))
                return self._window_step(node, path, inputs, hw, window, target)
            if target is F.avg_pool2d:
                window = _pool_windows(_arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None),
                                       _arg(node, 3, "padding", 0), 1, _arg(node, 4, "ceil_mode", False))
                return self._window_step(node, path, inputs, hw, window, target)
            if target in (torch.cat, torch.concat, torch.concatenate):
                self._require_free_axis(path, hw, _arg(node, 1, "dim", 0), "concatenates along")
                return Step(node.name, path, node, True, None, hw, tuple(inputs), target)
            if target in (torch.permute, torch.transpose):
                return self._layout_step(node, path, inputs, hw, target)
            if target is F.layer_norm:
                shape = _arg(node, 1, "normalized_shape", None)
                self._require_free_trailing(path, hw, len(_pair_list(shape)), "normalises over")
            elif target is F.linear:
                self._require_free_trailing(path, hw, 1, "mixes")
            elif target is F.batch_norm:
                if _arg(node, 5, "training", False) or _arg(node, 1, "running_mean", None) is None:
                    raise UnsupportedLayerError(path, _BATCHNORM_TRAINING)
                self._require_channels_first(path, hw)
            elif target in (F.dropout, F.dropout2d, F.alpha_dropout):
                if _arg(node, 2, "training", True) and _arg(node, 1, "p", 0.5) > 0:
                    raise UnsupportedLayerError(path, _RANDOM_IN_TRAINING)
            elif getattr(target, "__name__", "") == "stochastic_depth":
                if _arg(node, 3, "training", True) and _arg(node, 1, "p", 0.0) > 0:
                    raise UnsupportedLayerError(path, _RANDOM_IN_TRAINING)
            elif target not in _POINTWISE_FUNCTIONS and target not in _ELEMENTWISE_FUNCTIONS:
                name = getattr(target, "__name__", str(target))
                raise UnsupportedLayerError(path, f"lightstream cannot prove that {name}() is local "
                                            "(position-wise or a sliding window)")
            self._check_broadcast(node, path, hw)
            return Step(node.name, path, node, True, None, hw, tuple(inputs), target)
        if node.op == "call_method":
            method = _INPLACE_METHODS.get(str(target), str(target))
            if method in ("permute", "transpose"):
                return self._layout_step(node, path, inputs, hw, method)
            if method not in _POINTWISE_METHODS:
                raise UnsupportedLayerError(path, f"lightstream cannot prove that .{method}() is local "
                                            "(it may read the size or mix positions of the feature map)")
            self._check_broadcast(node, path, hw)
            return Step(node.name, path, node, True, None, hw, tuple(inputs), method)
        raise UnsupportedLayerError(path, f"unsupported graph operation {node.op!r} on the feature map")

    def _classify_module(self, node: fx.Node, path: str, inputs: list[int], hw: tuple[int, int],
                         module: nn.Module) -> Step:
        for types, reason in _NONLOCAL_MODULES.items():
            if isinstance(module, types):
                raise UnsupportedLayerError(path, reason)
        kind = type(module).__name__
        if isinstance(module, nn.Conv2d):
            if type(module).forward is not nn.Conv2d.forward:
                raise UnsupportedLayerError(path, f"{kind} overrides Conv2d.forward; lightstream can "
                                            "only stream the standard convolution")
            if module.padding_mode == "circular":
                raise UnsupportedLayerError(path, "circular padding wraps around the whole image")
            window = _conv_windows(module.kernel_size, module.stride, module.padding, module.dilation)
            return self._window_step(node, path, inputs, hw, window, module)
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise UnsupportedLayerError(path, "max pooling with return_indices is not supported")
            window = _pool_windows(module.kernel_size, module.stride, module.padding,
                                   module.dilation, module.ceil_mode)
            return self._window_step(node, path, inputs, hw, window, module)
        if isinstance(module, nn.AvgPool2d):
            window = _pool_windows(module.kernel_size, module.stride, module.padding, 1, module.ceil_mode)
            return self._window_step(node, path, inputs, hw, window, module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                raise UnsupportedLayerError(path, _BATCHNORM_TRAINING)
            self._require_channels_first(path, hw)
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            if module.training and module.p > 0:
                raise UnsupportedLayerError(path, _RANDOM_IN_TRAINING)
        elif isinstance(module, nn.LayerNorm):
            self._require_free_trailing(path, hw, len(module.normalized_shape), "normalises over")
        elif isinstance(module, nn.Linear):
            self._require_free_trailing(path, hw, 1, "mixes")
        elif isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                self._require_channels_first(path, hw)
        elif not isinstance(module, _POINTWISE_MODULES):
            raise UnsupportedLayerError(path, f"lightstream cannot prove that {kind} is local "
                                        "(position-wise or a sliding window); supported are "
                                        "convolutions, pooling, activations and per-pixel layers")
        return Step(node.name, path, node, True, None, hw, tuple(inputs), module)

    def _window_step(self, node: fx.Node, path: str, inputs: list[int], hw: tuple[int, int],
                     window: tuple[Window, Window], target: Any) -> Step:
        if hw != (2, 3) or len(inputs) != 1 or node.args[0] is not self.steps[inputs[0]].node:
            raise UnsupportedLayerError(path, "a convolution or pooling must read one [B, C, H, W] map")
        return Step(node.name, path, node, True, window, hw, tuple(inputs), target)

    def _layout_step(self, node: fx.Node, path: str, inputs: list[int], hw: tuple[int, int],
                     target: Any) -> Step:
        if target in ("permute", torch.permute):
            order = [a for a in node.args[1:]] if node.op == "call_method" else _arg(node, 1, "dims", None)
            if node.op == "call_method" and len(order) == 1 and isinstance(order[0], (tuple, list)):
                order = list(order[0])
            order = [int(a) % 4 for a in order]
        else:
            a, b = (int(x) % 4 for x in node.args[1:3])
            order = list(range(4))
            order[a], order[b] = order[b], order[a]
        new = (order.index(hw[0]), order.index(hw[1]))
        return Step(node.name, path, node, True, None, new, tuple(inputs), target)

    def _require_free_axis(self, path: str, hw: tuple[int, int], dim: int, verb: str) -> None:
        if int(dim) % 4 in hw:
            raise UnsupportedLayerError(path, f"it {verb} a spatial axis of the feature map")

    def _require_free_trailing(self, path: str, hw: tuple[int, int], count: int, verb: str) -> None:
        if any(d >= 4 - count for d in hw):
            raise UnsupportedLayerError(path, f"it {verb} the spatial axes (e.g. Linear over space); "
                                        "only per-pixel (channel) operations are local")

    def _require_channels_first(self, path: str, hw: tuple[int, int]) -> None:
        if hw != (2, 3):
            raise UnsupportedLayerError(path, "it expects channels at axis 1 but gets a permuted map")

    def _check_broadcast(self, node: fx.Node, path: str, hw: tuple[int, int]) -> None:
        for arg in node.all_input_nodes:
            if self.steps[self._index[arg]].spatial:
                continue
            value = self._examples.get(arg)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                for d in hw:
                    axis = d - (4 - value.dim())
                    if axis >= 0 and value.shape[axis] != 1:
                        raise UnsupportedLayerError(path, "it combines the feature map with a "
                                                    "tensor that varies over space (e.g. a positional "
                                                    "embedding), which is not local")

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
            observe: Callable[[int, torch.Tensor], None] | None = None
            ) -> tuple[torch.Tensor, Span, Span]:
        """Run the trunk on ``tile`` (image rows ``rows`` and columns ``cols``).

        Returns the output tensor and the rows and columns of the full output map it holds;
        every value returned equals the whole-image computation at that position.
        ``observe(step_index, tensor)`` is called with every spatial step's result; such a
        shape probe skips the modules' forward hooks (users' hooks see only real passes).
        """
        hooks = observe is None
        values: list[Any] = [None] * len(self.steps)
        spans: list[tuple[Span, Span]] = [((0, 0), (0, 0))] * len(self.steps)

        def lookup(n: fx.Node) -> Any:
            return values[self._index[n]]

        for index, step in enumerate(self.steps):
            if not step.spatial:
                values[index] = self._call(step.node, step.target, lookup, hooks)
            elif not step.inputs:
                values[index], spans[index] = tile, (rows, cols)
            else:
                if step.window is not None:
                    source = step.inputs[0]
                    values[index], spans[index] = self._run_window(step, values[source], spans[source],
                                                                   sizes[source], lookup, hooks)
                else:
                    values[index], spans[index] = self._run_merged(step, values, spans, hooks)
                if observe is not None:
                    observe(index, values[index])
            for done in self._released_after[index]:
                values[done] = None
        return values[self.output], spans[self.output][0], spans[self.output][1]

    def _run_merged(self, step: Step, values: list[Any], spans: list[tuple[Span, Span]], hooks: bool
                    ) -> tuple[Any, tuple[Span, Span]]:
        """A position-wise step: its spatial operands cropped to their common rows and columns."""
        box = spans[step.inputs[0]]
        if len(step.inputs) > 1:
            box = tuple((max(spans[i][a][0] for i in step.inputs),
                         min(spans[i][a][1] for i in step.inputs)) for a in range(2))  # type: ignore[assignment]
        cropped = {i: crop_to(values[i], spans[i], box, self.steps[i].dims) for i in step.inputs}

        def value(n: fx.Node) -> Any:
            i = self._index[n]
            return cropped[i] if i in cropped else values[i]

        return self._call(step.node, step.target, value, hooks), box

    def _run_window(self, step: Step, x: torch.Tensor, box: tuple[Span, Span], size: tuple[int, int],
                    lookup: Callable[[fx.Node], Any], hooks: bool) -> tuple[torch.Tensor, tuple[Span, Span]]:
        out_box, starts, pads, first = [], [], [], []
        for axis in range(2):
            window, (lo, hi), n = step.window[axis], box[axis], size[axis]  # type: ignore[index]
            out_lo, out_hi = window.exact_out(lo, hi, n)
            need_lo, need_hi = window.needed_in(out_lo, out_hi, n)
            # The op's output j reads from (t0 - pad_before + j*stride): align t0 to the stride so
            # that j maps onto the global output t0/stride + j.
            t0 = need_lo - need_lo % window.stride
            start = max(t0, lo)
            starts.append((start - lo, need_hi - start))
            pads.append(start - t0)
            first.append(out_lo - t0 // window.stride)
            out_box.append((out_lo, out_hi))
        x = _narrow(_narrow(x, 2, *starts[0]), 3, *starts[1])
        if pads[0] or pads[1]:
            x = F.pad(x, (pads[1], 0, pads[0], 0))
        source = step.node.args[0]
        y = self._call(step.node, step.target, lambda n: x if n is source else lookup(n), hooks)
        y = _narrow(y, 2, first[0], out_box[0][1] - out_box[0][0])
        y = _narrow(y, 3, first[1], out_box[1][1] - out_box[1][0])
        return y, (out_box[0], out_box[1])


_BATCHNORM_TRAINING = (
    "BatchNorm in training mode computes batch statistics over the whole image, which tiles "
    "cannot reproduce; call .eval() on it (StreamingModule.freeze_streaming_normalization_layers "
    "does this for you) so it uses its running statistics; its weight and bias still train exactly"
)
_RANDOM_IN_TRAINING = (
    "it draws random numbers in training mode, so recomputing a tile in the backward pass would "
    "see different randomness; set p=0 or call .eval() on it"
)


def _pair_list(shape: Any) -> list[int]:
    return list(shape) if isinstance(shape, (tuple, list, torch.Size)) else [shape]


def crop_to(x: torch.Tensor, have: tuple[Span, Span], want: tuple[Span, Span], dims: tuple[int, int] = (2, 3)
            ) -> torch.Tensor:
    """Cut ``x``, which holds rows and columns ``have`` of a map, down to ``want`` (a view)."""
    for axis in range(2):
        (lo, _), (wlo, whi) = have[axis], want[axis]
        x = _narrow(x, dims[axis], wlo - lo, whi - wlo)
    return x


def _narrow(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``x.narrow`` that returns ``x`` itself when the range is the whole axis: autograd records
    a slice even then, and its backward writes a zero-filled copy of the whole tensor."""
    if start == 0 and length == x.shape[dim]:
        return x
    return x.narrow(dim, start, length)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (or, without any, its buffers) live; the CPU for neither."""
    return next((t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu"))


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (the default dtype without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
