"""A traced call's arguments by parameter name, never by position.

``F.conv2d(x, w, None, 2)`` and ``F.conv2d(x, w, stride=2)`` are the same call; an op handler
asks for ``stride`` and must get ``2`` from both. torch.fx knows the schemas of torch's
operators (:meth:`torch.fx.Node.normalized_arguments`), but not of tensor methods, and it
refuses to choose between overloads (``conv2d`` takes ``padding`` as ints or as a string)
unless told the argument types. So this module asks fx first, again with the types when fx
finds the call ambiguous, and falls back on a Python stub whose signature names the
parameters (``Tensor.permute(*dims)`` has no schema fx can bind), then on the target's own
signature.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

__all__ = ["call_arguments"]


def call_arguments(node: fx.Node, root: torch.nn.Module, stub: Callable[..., Any] | None = None,
                   example: Callable[[fx.Node], Any] | None = None) -> dict[str, Any] | None:
    """Every argument of ``node``'s call by parameter name, defaults filled in.

    Args:
        node: a ``call_function``, ``call_method`` or ``call_module`` node.
        root: the traced module (fx resolves ``call_module`` targets in it).
        stub: a Python function with the call's signature, used where torch has no schema.
        example: the trace-time value of an input node, to tell fx the argument types when
            an operator has several overloads; a node without one is taken for a tensor.

    Returns:
        The arguments (values are fx nodes or constants), or ``None`` when no signature binds.
    """
    normalized = _normalized(node, root, None, None)
    if normalized is None:
        normalized = _normalized(node, root, *_argument_types(node, example))
    if normalized is not None:
        return dict(normalized.kwargs)
    bound = _bind(stub, node, variadic=True) if stub is not None else None
    if bound is None and callable(node.target):
        bound = _bind(node.target, node, variadic=False)
    return bound


def _normalized(node: fx.Node, root: torch.nn.Module, arg_types: tuple | None, kwarg_types: dict | None
                ) -> Any:
    try:
        if node.op == "call_method":  # fx does not normalise methods; torch.<name> has the schema
            function = getattr(torch, str(node.target), None)
            return None if not callable(function) else normalize_function(
                function, node.args, node.kwargs, arg_types, kwarg_types, normalize_to_only_use_kwargs=True)
        return node.normalized_arguments(root, arg_types, kwarg_types, normalize_to_only_use_kwargs=True)
    except (RuntimeError, TypeError, ValueError):  # an ambiguous or unbindable schema
        return None


def _argument_types(node: fx.Node, example: Callable[[fx.Node], Any] | None) -> tuple[tuple, dict]:
    def type_of(value: Any) -> Any:
        if isinstance(value, fx.Node):
            value = example(value) if example is not None else None
            return torch.Tensor if value is None else type(value)
        if isinstance(value, (list, tuple)) and value:
            return typing.List[type_of(value[0])]  # fx matches typing.List, not list
        return type(value)

    return tuple(type_of(a) for a in node.args), {k: type_of(v) for k, v in node.kwargs.items()}


def _bind(function: Callable[..., Any], node: fx.Node, variadic: bool) -> dict[str, Any] | None:
    """Bind the call to ``function``'s signature; one that is not a stub must name every
    parameter (a ``*args, **kwargs`` wrapper would bind anything and name nothing)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a Python signature
        return None
    kinds = {p.kind for p in signature.parameters.values()}
    if not variadic and kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return None
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)
