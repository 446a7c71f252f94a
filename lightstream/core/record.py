"""The forward record: what a streamed backward needs from its forward, checked when it runs.

Plain autograd refuses a backward whose saved tensors were modified in place; a streamed
backward recomputes its tiles from the image and the trunk's parameters, so it must refuse the
same things, or it would silently compute gradients of a network nobody ran:

* the image or a trunk parameter modified in place since the forward (version counters; e.g.
  an ``optimizer.step()`` between the forward and the backward),
* a second backward of one forward (gradients would be counted twice),
* a backward for another image than the forward's,
* a trunk whose modules, modes or attributes changed (its trace would be stale), or ``mean`` /
  ``std`` changed, since the forward,
* a gradient that is not the shape of the feature map the forward returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import StreamingError
from .execution import Kept
from .inputs import Autocast, Normaliser
from .planner import Planner, StreamPlan

__all__ = ["ForwardRecord", "StaleForwardError"]


class StaleForwardError(StreamingError, RuntimeError):
    """A streamed backward cannot reproduce its forward (something it depends on changed)."""


def _version(value: Any) -> int:
    return value._version if isinstance(value, torch.Tensor) else 0


@dataclass
class ForwardRecord:
    """One streamed forward, as its backward will need it (see the module docstring)."""

    planner: Planner
    plan: StreamPlan
    image: Any
    image_version: int
    parameters: tuple[tuple[str, torch.Tensor, int], ...]
    output_shape: tuple[int, ...]
    autocast: Autocast
    normaliser: Normaliser
    kept: list[Kept] | None = None
    used: bool = field(default=False)

    @classmethod
    def of(cls, planner: Planner, plan: StreamPlan, image: Any, trunk: nn.Module, output: torch.Tensor,
           autocast: Autocast, normaliser: Normaliser, kept: list[Kept] | None) -> ForwardRecord:
        parameters = tuple((name, p, p._version) for name, p in trunk.named_parameters())
        return cls(planner, plan, image, _version(image), parameters, tuple(output.shape), autocast,
                   normaliser, kept)

    def check(self, image: Any, grad: torch.Tensor | None, planner: Planner, normaliser: Normaliser,
              what: str = "backward") -> None:
        """Raise if the backward ``what`` of ``image`` with ``grad`` cannot reproduce this forward."""
        if self.used:
            raise StaleForwardError(f"{what}: this forward has already been backpropagated; run the "
                                    "forward again (one backward per forward, as autograd's graphs)")
        if image is not self.image:
            raise StaleForwardError(f"{what}: got another image than the last forward's; pass the same "
                                    "image object, or run the forward on this image first")
        if _version(image) != self.image_version:
            raise StaleForwardError(f"{what}: the image was modified in place after the forward (version "
                                    f"{self.image_version} -> {_version(image)}); the backward would use the "
                                    "new pixels. Modify a copy, or run the forward again")
        for name, param, version in self.parameters:
            if param._version != version:
                raise StaleForwardError(
                    f"{what}: trunk parameter '{name}' was modified in place after the forward (version "
                    f"{version} -> {param._version}), e.g. by optimizer.step(); step the optimiser "
                    "after the backward")
        if planner is not self.planner:
            raise StaleForwardError(f"{what}: the trunk's modules, train/eval modes or attributes changed "
                                    "after the forward; change them before the forward, not between")
        if normaliser is not self.normaliser:
            raise StaleForwardError(f"{what}: mean or std changed after the forward; change them before it")
        if grad is None:
            raise ValueError(f"{what}: grad is None; call fmap.requires_grad_() before the head's backward")
        if tuple(grad.shape) != self.output_shape:
            raise ValueError(f"{what}: grad has shape {tuple(grad.shape)} but the feature map the forward "
                             f"returned has shape {self.output_shape}; pass the feature map's gradient")

