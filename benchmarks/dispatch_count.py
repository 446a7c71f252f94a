"""Count the aten operations a piece of code dispatches (forward and backward), by op name.

On a GPU nearly every dispatched operation is a kernel launch, so the count shows per-tile
overhead on any device, the CPU included. The mode sits below autograd: composite operations
are counted as the operations they decompose into, as the kernels see them.

    with DispatchCounter() as ops:
        loss.backward()
    print(ops.total, ops.counts.most_common(10))
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchCounter(TorchDispatchMode):
    """A dispatch mode that counts every aten operation by its name (``slice``, ``add_``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """All operations counted so far."""
        return sum(self.counts.values())


def format_count(count: float) -> str:
    """``9123`` as ``9.1k``, ``480`` as ``480``."""
    return f"{count / 1000:.1f}k" if count >= 1000 else f"{count:.0f}"
