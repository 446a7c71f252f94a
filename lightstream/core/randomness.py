"""Random draws inside the streamed trunk, found and refused at construction.

The backward pass recomputes every tile, and the trace replays the trunk tile by tile: a
dropout mask or noise drawn in ``forward`` (on the feature map or not) would be drawn anew for
each tile and again in the backward, so neither the tiles nor the gradient would match any
whole-image pass. So a trunk that draws random numbers is refused, naming where.

Which operators draw is torch's own knowledge, not a list kept here: ATen tags every seeded
random operator (``rand``, ``randn_like``, ``bernoulli_``, ``normal_``, ``dropout`` ...) with
:attr:`torch.Tag.nondeterministic_seeded`. Each traced call is checked by its name against
those tags before its own checks, in graph order (a size read that only feeds a draw, as in
``torch.randn(x.shape)``, reports the draw). The image-independent steps, evaluated for real
at trace time, run under :class:`SeededDraws`, which sees every operator dispatched, also
inside Python functions fx does not look into. Spatial steps need no such probe: each one is
an entry of the op table (everything else is refused), and the few entries that can draw
(dropout, ``RReLU``, stochastic depth) state when they do.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SeededDraws", "random_reason", "seeded_operator", "traced_name"]


@functools.cache
def seeded_operator(name: str) -> bool:
    """Whether the ATen operator ``name`` (``"randn_like"``, ``"bernoulli_"``) draws random numbers."""
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(torch.Tag.nondeterministic_seeded in getattr(packet, overload).tags
               for overload in packet.overloads())


def traced_name(node: fx.Node) -> str | None:
    """The operator name of a torch function or tensor method call (``None`` for others)."""
    if node.op == "call_method":
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    if node.op == "call_function" and module.startswith("torch"):
        return getattr(node.target, "__name__", None)
    return None


def random_reason(what: str) -> str:
    """The refusal of a random draw, saying what to do."""
    return (f"it draws random numbers ({what}): streaming recomputes each tile in the backward pass, "
            "so the tiles' draws would match neither each other nor a whole-image pass; call .eval() "
            "on it (or set p=0 for dropout) if it draws only in training mode, else move the random "
            "draw out of the streamed trunk")


class SeededDraws(TorchDispatchMode):
    """Records the random operators dispatched while it is active (``with SeededDraws() as d``)."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.drawn.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
