"""One streamed training step of a gigapixel image held in host memory as 8 bits, on a GPU.

    python benchmarks/gigapixel_step.py --model resnet34 --size 65536 --tile 2048 --dtype bf16 --stage-memory 1.5

The image (``[1, 3, size, size]`` uint8: 12 GiB at 65536²) stays in host memory; the engine
reads it tile by tile (a ``TensorSource`` over the CPU tensor), moves each tile to the device and
normalises it there. The trunk is a random-weight torchvision ResNet (BatchNorm frozen, eval),
the head a max-pool over the feature map and a linear layer, applied to the feature map in the
step's precision (autocast). Prints the stage plan, the estimate, then per step its wall-clock
time, ``torch.cuda.max_memory_allocated`` (the step's peak over the model; what decides whether
it fits a card) and the process's peak RSS.

``--stage-memory``: GiB for the kept stage maps, or ``auto`` (a sixteenth of this card's memory).
The default, 1.5, is what ``auto`` gives a 24 GiB card, so that the peak shows whether the step
trains on one. ``--device cpu`` with a small ``--size`` checks the script without a GPU.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lightstream import StreamingCNN
from lightstream.core import TensorSource
from step_fixture import DTYPES, MEAN, STD, build, freeze_batchnorm, peak_memory, reset_peak, timed

GIB = 2**30


def host_image(size: int, rows: int = 4096) -> torch.Tensor:
    """A random 8-bit ``[1, 3, size, size]`` image in host memory, filled a band of rows at a time."""
    image = torch.empty((1, 3, size, size), dtype=torch.uint8)
    for top in range(0, size, rows):
        band = image[:, :, top:top + rows]
        band.copy_(torch.randint(0, 256, band.shape, dtype=torch.uint8))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--stage-memory", default="1.5", help="GiB for kept stage maps, or auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=1, help="steps (each reported)")
    args = parser.parse_args()

    torch.manual_seed(0)
    trunk, head = build(args.model, args.device)
    freeze_batchnorm(trunk)
    stage_memory = "auto" if args.stage_memory == "auto" else int(float(args.stage_memory) * GIB)
    engine = StreamingCNN(trunk, tile_size=args.tile, mean=MEAN, std=STD, stage_memory=stage_memory)
    amp = DTYPES[args.dtype]
    source = TensorSource(host_image(args.size))
    shape = source.shape
    plans = engine.stage_plans(shape, amp or torch.float32)
    estimate = engine.estimate(shape, amp or torch.float32)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {args.model} trunk, {args.size}² uint8 image in host memory ({source.image.numel() / GIB:.1f} GiB), "
          f"tile {args.tile}, {args.dtype}, stage_memory {engine.stage_memory_bytes / GIB:.2f} GiB, {name}, "
          f"torch {torch.__version__}")
    print("# stages:", " ".join(f"{p.stage.name}:{p.tile_size[0]}×{p.plan.grid[0]}×{p.plan.grid[1]}" for p in plans),
          f"({estimate.tiles} tiles); estimated peak {estimate.peak_bytes / GIB:.2f} GiB, "
          f"kept maps {estimate.stage_map_bytes / GIB:.2f} GiB, feature map {estimate.feature_map_bytes / GIB:.2f} GiB")
    target = torch.zeros(1, dtype=torch.long, device=args.device)

    def step() -> torch.Tensor:
        with torch.autocast(args.device, dtype=amp or torch.float32, enabled=amp is not None):
            fmap = engine.forward_autograd(source)
            loss = nn.functional.cross_entropy(head(fmap).float(), target)
        loss.backward()
        return fmap

    print("| step | time | max allocated | peak RSS |")
    print("|---|---|---|---|")
    for index in range(args.reps):
        reset_peak("cpu")
        reset_peak(args.device)
        seconds, fmap = timed(step, args.device)
        del fmap
        device_peak = f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB" if args.device == "cuda" else "—"
        print(f"| {index + 1} | {seconds:.1f} s | {device_peak} | {peak_memory('cpu'):.2f} GiB |", flush=True)
        for p in [*trunk.parameters(), *head.parameters()]:
            p.grad = None


if __name__ == "__main__":
    main()
