"""The op table: every operation lightstream streams or refuses, registered in one place.

:data:`OPS` maps a module type (matched along its class hierarchy), a function, a tensor
:class:`~lightstream.core.ops.Method`, or the qualified name of a function outside torch to an
:class:`~lightstream.core.ops.Op`: its family (which states the geometry and how a tile crops
it) and its rule (the op-specific checks, arguments read by name). A call of anything not in
the table is refused: lightstream cannot prove it local. To support a new operation, add one
entry and a float64 test that streams it exactly (output, parameter and input gradients).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .ops import Layout, Method, Op, OpCall, OpGeometry, PositionWise, Refused, SlidingWindow
from .randomness import random_reason, seeded_operator, traced_name
from .resample import Resampling, TransposedWindow
from .window import Window

__all__ = ["CONVOLUTION", "LAYOUT", "MERGE", "NORMALISATION", "OPS", "POINTWISE", "POOLING", "REFUSED",
           "TRANSPOSED_CONVOLUTION", "UPSAMPLING", "lookup", "random_draw", "resolve"]

CONVOLUTION = SlidingWindow("convolution")
POOLING = SlidingWindow("pooling")
TRANSPOSED_CONVOLUTION = SlidingWindow("transposed convolution")
UPSAMPLING = SlidingWindow("upsampling")
POINTWISE = PositionWise("pointwise")
NORMALISATION = PositionWise("normalisation", broadcast=False)
MERGE = PositionWise("merge")
LAYOUT = Layout("layout")
REFUSED = Refused("refused")

_IN_PLACE: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    **{f"{name}_": name for name in ("add", "sub", "mul", "div", "relu", "clamp", "sigmoid", "tanh")},
}
"""In-place ops run as their out-of-place twins: a tile's operand may be a view that another
step still reads, or a tensor autograd saved."""


# ---------------------------------------------------------------- sliding windows
def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list, torch.Size)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def conv_windows(kernel: Any, stride: Any, padding: Any, dilation: Any) -> tuple[Window, Window]:
    """The windows of a convolution (``padding`` may be ``"same"`` or ``"valid"``)."""
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


def pool_windows(kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> tuple[Window, Window]:
    """The windows of a pooling (no stride means stride = kernel, as in PyTorch)."""
    k = _pair(kernel)
    s = _pair(stride) if stride not in (None, (), []) else k
    p, d = _pair(padding), _pair(dilation)
    return (Window(k[0], s[0], d[0], p[0], p[0], bool(ceil_mode)),
            Window(k[1], s[1], d[1], p[1], p[1], bool(ceil_mode)))


def _conv_module(call: OpCall) -> tuple[Window, Window]:
    conv = call.module
    if type(conv).forward is not nn.Conv2d.forward:
        call.refuse(f"{type(conv).__name__} overrides Conv2d.forward; lightstream can only stream the "
                    "standard convolution")
    if conv.padding_mode == "circular":
        call.refuse("circular padding wraps around the whole image")
    return conv_windows(conv.kernel_size, conv.stride, conv.padding, conv.dilation)


def _conv_function(call: OpCall) -> tuple[Window, Window]:
    weight = call.argument("weight")
    weight = call.example(weight) if isinstance(weight, fx.Node) else None
    if not isinstance(weight, torch.Tensor):
        call.refuse("the convolution weight depends on the image")
    return conv_windows(tuple(weight.shape[-2:]), call.argument("stride", 1), call.argument("padding", 0),
                        call.argument("dilation", 1))


def _max_pool_module(call: OpCall) -> tuple[Window, Window]:
    pool = call.module
    if pool.return_indices:
        call.refuse("max pooling with return_indices is not supported")
    return pool_windows(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)


def _max_pool_function(call: OpCall) -> tuple[Window, Window]:
    if call.argument("return_indices", False):
        call.refuse("max pooling with return_indices is not supported")
    return pool_windows(call.argument("kernel_size"), call.argument("stride"), call.argument("padding", 0),
                        call.argument("dilation", 1), call.argument("ceil_mode", False))


def _avg_pool_module(call: OpCall) -> tuple[Window, Window]:
    pool = call.module
    return pool_windows(pool.kernel_size, pool.stride, pool.padding, 1, pool.ceil_mode)


def _avg_pool_function(call: OpCall) -> tuple[Window, Window]:
    return pool_windows(call.argument("kernel_size"), call.argument("stride"), call.argument("padding", 0), 1,
                        call.argument("ceil_mode", False))


# ---------------------------------------------------------------- upsampling (output stride below one)
_ALIGN_CORNERS = ("align_corners=True maps output positions through the whole map's size ((n - 1) / "
                  "(out - 1)), which no tile knows, so tiles cannot reproduce it; use align_corners=False "
                  "(the default) or nearest upsampling")
_INTERPOLATION_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "bilinear",
                        "bicubic": "bicubic"}


def _integer_factors(call: OpCall, value: Any, what: str) -> tuple[int, int]:
    factors = value if isinstance(value, (tuple, list)) else (value, value)
    if len(factors) != 2:
        call.refuse(f"it gives {what} {value!r}; a 2-d map needs one or two factors")
    out = []
    for factor in factors:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1 or factor != int(factor):
            call.refuse(f"its {what} {value!r} is not a whole number >= 1; lightstream streams upsampling "
                        "by integer factors (tile borders then fall on whole input pixels)")
        out.append(int(factor))
    return out[0], out[1]


def _interpolation(call: OpCall, size: Any, scale_factor: Any, mode: Any, align_corners: Any,
                   recompute_scale_factor: Any = None, antialias: Any = False) -> tuple[Resampling, Resampling]:
    if size is not None:
        call.refuse(f"it resizes to a fixed size={size!r}, set by the whole map, which a tile cannot know; "
                    "give scale_factor instead")
    if scale_factor is None:
        call.refuse("it gives neither size nor scale_factor")
    if mode not in _INTERPOLATION_MODES:
        call.refuse(f"mode={mode!r} is not streamed; supported are {', '.join(_INTERPOLATION_MODES)} "
                    "(with align_corners=False)")
    if align_corners:
        call.refuse(_ALIGN_CORNERS)
    if recompute_scale_factor or antialias:
        call.refuse("recompute_scale_factor=True and antialias=True are not streamed; leave them at their defaults")
    factors = _integer_factors(call, scale_factor, "scale_factor")
    if any(f & (f - 1) for f in factors):
        call.refuse(f"it upsamples by {scale_factor!r}, not a power of two: PyTorch maps output o to input "
                    "position (o + 0.5) / factor - 0.5 (or o / factor) in floating point, exactly only when "
                    "1 / factor is a power of two; otherwise the rounding depends on o, so a tile (small "
                    "positions) and the whole image (large ones) pick different pixels or weights (up to "
                    "1e-2 in float32 far from the origin); use a power-of-two factor, PixelShuffle or a "
                    "ConvTranspose2d")
    return Resampling(factors[0], mode), Resampling(factors[1], mode)


def _upsample_module(call: OpCall) -> tuple[Resampling, Resampling]:
    up = call.module
    if type(up).forward is not nn.Upsample.forward:
        call.refuse(f"{type(up).__name__} overrides Upsample.forward; lightstream can only stream the standard one")
    return _interpolation(call, up.size, up.scale_factor, up.mode, up.align_corners,
                          getattr(up, "recompute_scale_factor", None))


def _interpolate_function(call: OpCall) -> tuple[Resampling, Resampling]:
    return _interpolation(call, call.argument("size"), call.argument("scale_factor"),
                          call.argument("mode", "nearest"), call.argument("align_corners"),
                          call.argument("recompute_scale_factor"), call.argument("antialias", False))


def _shuffle(call: OpCall, factor: Any) -> tuple[Resampling, Resampling]:
    factors = _integer_factors(call, int(factor) if isinstance(factor, int) else factor, "upscale_factor")
    return Resampling(factors[0], "pixel_shuffle"), Resampling(factors[1], "pixel_shuffle")


def _unshuffle(call: OpCall, factor: Any) -> tuple[Window, Window]:
    r = _integer_factors(call, factor, "downscale_factor")
    return Window(r[0], r[0], whole_windows=True), Window(r[1], r[1], whole_windows=True)


def _transposed_windows(call: OpCall, kernel: Any, stride: Any, padding: Any, output_padding: Any,
                        dilation: Any) -> tuple[TransposedWindow, TransposedWindow]:
    if isinstance(padding, str):
        call.refuse(f"padding={padding!r} is not streamed for a transposed convolution; give it in pixels")
    k, s, p, op, d = (_pair(v) for v in (kernel, stride, padding, output_padding, dilation))
    return (TransposedWindow(k[0], s[0], d[0], p[0], op[0]), TransposedWindow(k[1], s[1], d[1], p[1], op[1]))


def _conv_transpose_module(call: OpCall) -> tuple[TransposedWindow, TransposedWindow]:
    conv = call.module
    if type(conv).forward is not nn.ConvTranspose2d.forward:
        call.refuse(f"{type(conv).__name__} overrides ConvTranspose2d.forward; lightstream can only stream "
                    "the standard transposed convolution")
    if call.argument("output_size") is not None:
        call.refuse("it is called with output_size=, set by the whole map, which a tile cannot know; "
                    "set output_padding on the layer instead")
    return _transposed_windows(call, conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation)


def _conv_transpose_function(call: OpCall) -> tuple[TransposedWindow, TransposedWindow]:
    weight = call.argument("weight")
    weight = call.example(weight) if isinstance(weight, fx.Node) else None
    if not isinstance(weight, torch.Tensor):
        call.refuse("the transposed convolution's weight depends on the image")
    return _transposed_windows(call, tuple(weight.shape[-2:]), call.argument("stride", 1),
                               call.argument("padding", 0), call.argument("output_padding", 0),
                               call.argument("dilation", 1))


# ---------------------------------------------------------------- per-pixel normalisation
_BATCHNORM_TRAINING = (
    "BatchNorm in training mode computes batch statistics over the whole image, which tiles "
    "cannot reproduce; call .eval() on it (StreamingModule.freeze_streaming_normalization_layers "
    "does this for you) so it uses its running statistics; its weight and bias still train exactly"
)


def _batch_norm_module(call: OpCall) -> None:
    if call.module.training or call.module.running_mean is None:
        call.refuse(_BATCHNORM_TRAINING)
    call.require_channels_first()


def _batch_norm_function(call: OpCall) -> None:
    if call.argument("training", False) or call.argument("running_mean") is None:
        call.refuse(_BATCHNORM_TRAINING)
    call.require_channels_first()


def _layer_norm_module(call: OpCall) -> None:
    call.require_free_trailing(len(call.module.normalized_shape), "normalises over")


def _layer_norm_function(call: OpCall) -> None:
    shape = call.argument("normalized_shape")
    call.require_free_trailing(len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1,
                               "normalises over")


def _over_channels(call: OpCall) -> None:
    call.require_free_trailing(1, "mixes")


def _prelu_module(call: OpCall) -> None:
    if call.module.num_parameters > 1:
        call.require_channels_first()


def _channels_first(call: OpCall) -> None:
    call.require_channels_first()


# ---------------------------------------------------------------- random draws of pointwise ops
def _dropout_module_draws(call: OpCall) -> bool:
    return bool(call.module.training and call.module.p > 0)


def _dropout_function_draws(call: OpCall) -> bool:
    return bool(call.argument("training", True) and call.argument("p", 0.5) > 0)


def _rrelu_module_draws(call: OpCall) -> bool:
    return bool(call.module.training)


def _rrelu_function_draws(call: OpCall) -> bool:
    return bool(call.argument("training", False))


def _stochastic_depth_draws(call: OpCall) -> bool:
    return bool(call.argument("training", True) and call.argument("p", 0.0) > 0)


# ---------------------------------------------------------------- merges and layout
def _concatenate(call: OpCall) -> None:
    call.require_free_axis(call.argument("dim", 0), "concatenates along")


def _permute_method(input: Any, *dims: Any) -> None:
    """``Tensor.permute(*dims)``: the signature torch's schema (``dims: int[]``) cannot bind."""


def _transpose_method(input: Any, dim0: int, dim1: int) -> None:
    """``Tensor.transpose(dim0, dim1)``."""


def _permute(call: OpCall) -> list[int]:
    dims = call.argument("dims")
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [int(a) % 4 for a in dims]


def _transpose(call: OpCall) -> list[int]:
    a, b = int(call.argument("dim0")) % 4, int(call.argument("dim1")) % 4
    order = list(range(4))
    order[a], order[b] = order[b], order[a]
    return order


# ---------------------------------------------------------------- refusals
_GLOBAL_POOLING = ("adaptive/global pooling combines the whole feature map; end the trunk before it and "
                   "apply it in the head, on the stitched feature map")
_STATISTICS = ("it normalises with statistics over all positions of the image; use BatchNorm in eval "
               "mode, a channel LayerNorm, or move it to the head")
_RESHAPE = "it reshapes the spatial axes, so positions no longer stay apart"
_GRID = ("it changes the spatial grid in a way lightstream does not stream (supported are convolutions, "
         "pooling, transposed 2-d convolutions, integer upsampling and pixel (un)shuffle)")
_REDUCTION = "a reduction over the feature map is global; do it in the head"

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.Identity,
)
_POINTWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh,
    torch.abs, torch.square, torch.clamp, torch.clip, torch.erf, torch.neg, operator.neg, operator.pos,
)
_POINTWISE_METHODS = (
    "relu", "sigmoid", "tanh", "abs", "neg", "clamp", "clip", "square",
    "contiguous", "clone", "float", "double", "bfloat16", "to", "type_as",
)
_UNBOUNDED_POINTWISE = (
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.pow, operator.pow,
    *(Method(name) for name in ("exp", "sqrt", "pow", "half")),
)
"""Pointwise ops that can make finite values infinite or NaN (see :attr:`Op.bounded`)."""
_ELEMENTWISE = (
    operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.maximum, torch.minimum,
    torch.where, *(Method(name) for name in ("add", "sub", "mul")),
)
_DIVISIONS = (operator.truediv, torch.div, Method("div"))
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)

_ENTRIES: list[tuple[tuple[Any, ...], Op]] = [
    ((nn.Conv2d,), Op(CONVOLUTION, _conv_module)),
    ((F.conv2d,), Op(CONVOLUTION, _conv_function)),  # torch.conv2d is the same function
    ((nn.MaxPool2d,), Op(POOLING, _max_pool_module)),
    ((F.max_pool2d, torch.max_pool2d), Op(POOLING, _max_pool_function)),
    ((nn.AvgPool2d,), Op(POOLING, _avg_pool_module)),
    ((F.avg_pool2d,), Op(POOLING, _avg_pool_function)),
    (_POINTWISE_MODULES + _POINTWISE_FUNCTIONS + tuple(Method(m) for m in _POINTWISE_METHODS), Op(POINTWISE)),
    (_UNBOUNDED_POINTWISE, Op(POINTWISE, bounded=False)),
    ((nn.modules.dropout._DropoutNd,), Op(POINTWISE, draws=_dropout_module_draws)),
    (_DROPOUT_FUNCTIONS, Op(POINTWISE, draws=_dropout_function_draws)),
    (("torchvision.ops.stochastic_depth.stochastic_depth",), Op(POINTWISE, draws=_stochastic_depth_draws)),
    ((nn.RReLU,), Op(POINTWISE, draws=_rrelu_module_draws)),
    ((F.rrelu,), Op(POINTWISE, draws=_rrelu_function_draws)),
    ((nn.modules.batchnorm._BatchNorm,), Op(NORMALISATION, _batch_norm_module)),
    ((F.batch_norm,), Op(NORMALISATION, _batch_norm_function)),
    ((nn.LayerNorm,), Op(NORMALISATION, _layer_norm_module)),
    ((F.layer_norm,), Op(NORMALISATION, _layer_norm_function)),
    ((nn.Linear, F.linear), Op(NORMALISATION, _over_channels)),
    ((nn.PReLU,), Op(NORMALISATION, _prelu_module)),
    ((nn.LocalResponseNorm,), Op(NORMALISATION, _channels_first)),
    (_ELEMENTWISE, Op(MERGE)),
    (_DIVISIONS, Op(MERGE, bounded=False)),
    ((torch.cat, torch.concat, torch.concatenate), Op(MERGE, _concatenate)),
    ((torch.permute,), Op(LAYOUT, _permute)),
    ((Method("permute"),), Op(LAYOUT, _permute, signature=_permute_method)),
    ((torch.transpose,), Op(LAYOUT, _transpose)),
    ((Method("transpose"),), Op(LAYOUT, _transpose, signature=_transpose_method)),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d),
     Op(REFUSED, reason=_GLOBAL_POOLING)),
    ((nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.group_norm, F.instance_norm),
     Op(REFUSED, reason=_STATISTICS)),
    ((nn.MultiheadAttention, F.scaled_dot_product_attention),
     Op(REFUSED, reason="attention mixes all positions of the feature map")),
    ((nn.Flatten, nn.Unflatten, torch.flatten), Op(REFUSED, reason=_RESHAPE)),
    ((nn.ConvTranspose2d,), Op(TRANSPOSED_CONVOLUTION, _conv_transpose_module)),
    ((F.conv_transpose2d,), Op(TRANSPOSED_CONVOLUTION, _conv_transpose_function)),
    ((nn.Upsample,), Op(UPSAMPLING, _upsample_module)),  # UpsamplingBilinear2d: align_corners=True, refused
    ((F.interpolate,), Op(UPSAMPLING, _interpolate_function)),
    ((nn.PixelShuffle,), Op(UPSAMPLING, lambda call: _shuffle(call, call.module.upscale_factor))),
    ((F.pixel_shuffle,), Op(UPSAMPLING, lambda call: _shuffle(call, call.argument("upscale_factor")))),
    ((nn.PixelUnshuffle,), Op(POOLING, lambda call: _unshuffle(call, call.module.downscale_factor))),
    ((F.pixel_unshuffle,), Op(POOLING, lambda call: _unshuffle(call, call.argument("downscale_factor")))),
    ((nn.ConvTranspose1d, nn.ConvTranspose3d, F.conv_transpose1d, F.conv_transpose3d), Op(REFUSED, reason=_GRID)),
    ((torch.mean, torch.sum), Op(REFUSED, reason=_REDUCTION)),
    ((F.max_pool2d_with_indices,), Op(REFUSED, reason="max pooling with return_indices is not supported")),
]

OPS: dict[Any, Op] = {key: op for keys, op in _ENTRIES for key in keys}
"""Every supported or refused operation, keyed by module type, function, :class:`Method` or
qualified function name."""


def lookup(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Any, Op | None]:
    """A call's target as it will run (the module; an in-place op's out-of-place twin) and its entry."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        return module, next((OPS[cls] for cls in type(module).__mro__ if cls in OPS), None)
    if node.op == "call_method":
        name = _IN_PLACE.get(str(node.target), str(node.target))
        return name, OPS.get(Method(name))
    target = _IN_PLACE.get(node.target, node.target)
    qualified = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
    return target, OPS.get(target, OPS.get(qualified))


def resolve(call: OpCall, op: Op | None) -> OpGeometry:
    """The geometry of a call on the feature map, or an error naming its path and why it is refused."""
    if op is not None:
        return op.family.geometry(op, call)
    node = call.node
    if node.op == "call_module":
        call.refuse(f"lightstream cannot prove that {_name(call)} is local (position-wise or a sliding "
                    "window); supported are convolutions, pooling, activations and per-pixel layers")
    if node.op == "call_method":
        call.refuse(f"lightstream cannot prove that {_name(call)} is local (it may read the size or mix "
                    "positions of the feature map)")
    if node.op == "call_function":
        call.refuse(f"lightstream cannot prove that {_name(call)} is local (position-wise or a sliding window)")
    call.refuse(f"unsupported graph operation {node.op!r} on the feature map")


def _name(call: OpCall) -> str:
    if call.node.op == "call_module":
        return type(call.target).__name__
    if call.node.op == "call_method":
        return f".{call.target}()"
    return f"{getattr(call.target, '__name__', call.target)}()"


def random_draw(call: OpCall, op: Op | None) -> str | None:
    """The refusal reason when this call draws random numbers, else ``None``.

    An entry that states when it draws decides (dropout draws only in training mode with p > 0);
    any other torch function or tensor method draws when its ATen operator is tagged seeded.
    """
    if op is not None and op.draws is not None:
        if not op.draws(call):
            return None
        return random_reason(f"{_name(call)} in training mode")
    name = traced_name(call.node)
    return random_reason(_name(call)) if name is not None and seeded_operator(name) else None
