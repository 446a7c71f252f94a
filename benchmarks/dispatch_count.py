"""Count the aten operations a piece of code dispatches (forward and backward), by op name.

On a GPU nearly every dispatched operation is a kernel launch, so the count shows per-tile
overhead on any device, the CPU included. The mode sits below autograd: composite operations
are counted as the operations they decompose into, as the kernels see them.

    with DispatchCounter() as ops:
        loss.backward()
    print(ops.total, ops.counts.most_common(10))

Run as a script, it counts one training step of a torchvision trunk (whole image and the default
streamed step, forward + head + backward) on the ``meta`` device: shapes only, no arithmetic, so
a 4096² ResNet-34 step is counted in seconds (the counts equal the CPU's, less the 8-bit input's
normalisation that ``train_step.py`` adds to both):

    python benchmarks/dispatch_count.py --model resnet34 --size 2048 --tile 512
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
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


def main() -> None:
    from lightstream import StreamingCNN
    from step_fixture import build

    parser = argparse.ArgumentParser(description="dispatched aten ops of one train step, on the meta device")
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--stage-memory", type=int, default=None, help="bytes (default: the engine's)")
    args = parser.parse_args()
    trunk, head = build(args.model, "meta")
    options = {} if args.stage_memory is None else {"stage_memory": args.stage_memory}
    scnn = StreamingCNN(trunk, tile_size=args.tile, **options)
    image = torch.empty(1, 3, args.size, args.size, device="meta")
    for plan in scnn.stage_plans(image.shape):  # planned outside the count
        forward = plan.forward_plan
        own = "" if forward is None else (f"; forward: tile {forward.tile_size[0]}x{forward.tile_size[1]}, "
                                          f"{len(forward)} tiles in {len(plan.forward_batches)} runs")
        print(f"stage {plan.stage.name}: tile {plan.tile_size[0]}x{plan.tile_size[1]}, {len(plan.plan)} tiles in "
              f"{len(plan.batches)} runs{own}")
    totals = {}
    for mode, fmap in (("whole", lambda: trunk(image)), ("streamed", lambda: scnn.forward_autograd(image))):
        with DispatchCounter() as ops:
            head(fmap()).sum().backward()
        totals[mode] = ops.total
        print(f"{mode}: {ops.total} ops ({ops.total / totals['whole']:.1f}x whole)", ops.counts.most_common(6))


if __name__ == "__main__":
    main()
