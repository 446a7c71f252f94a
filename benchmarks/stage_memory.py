"""Streamed step time against the memory allowed for kept stage maps (``stage_memory``).

    python benchmarks/stage_memory.py --model resnet34 --size 8192 --tile 2048 --stage-memory auto 1 4 16

For each budget (GiB, or ``auto``: the engine's default for the device) and for one-piece
streaming, prints the stage plan (``stage:tile x rows x cols``), the estimate (time ratio, peak
memory, kept maps) and the measured step time with its ratio to the whole-image step of the same
run: the median of ``--reps`` steps after one untimed step each. The step is the one of
``train_step.py`` (8-bit image normalised per tile, ResNet trunk with a small head).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lightstream import StreamingCNN, TileTooSmallError
from step_fixture import DTYPES, MEAN, STD, build, make_image
from train_step import timed_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage-memory", nargs="+", default=["auto", "1", "4", "16"],
                        help="budgets in GiB, or auto")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    trunk, head = build(args.model, args.device, channels_last=False)
    image = make_image(args.size, args.device, channels_last=False, kind="uint8")
    shape, dtype = tuple(image.shape), DTYPES[args.dtype] or torch.float32

    def median_step(mode: str, engines: dict[str, StreamingCNN]) -> float:
        timed_step(mode, trunk, head, image, args, engines)  # kernel selection, caches
        return statistics.median(timed_step(mode, trunk, head, image, args, engines) for _ in range(args.reps))

    whole = median_step("whole", {})
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {args.model} trunk, {args.size}², tile {args.tile}, {args.dtype}, {name}: whole-image step {whole:.3f} s")
    print("| stage_memory | stages (tile × grid) | step | ratio to whole | estimated ratio | estimated peak | kept maps |")
    print("|---|---|---|---|---|---|---|")
    budgets: list[tuple[str, dict]] = [(b, {"stage_memory": "auto" if b == "auto" else int(float(b) * 2**30)})
                                       for b in args.stage_memory]
    for label, options in [*budgets, ("one stage", {"stages": None})]:
        try:
            engine = StreamingCNN(trunk, tile_size=args.tile, mean=MEAN, std=STD, **options)
        except TileTooSmallError as error:
            print(f"| {label} | skipped: {error} | | | | | |")
            continue
        plans = engine.stage_plans(shape, dtype)
        estimate = engine.estimate(shape, dtype)
        seconds = median_step("streamed", {"streamed": engine})
        stages = " ".join(f"{p.stage.name}:{p.tile_size[0]}×{p.plan.grid[0]}×{p.plan.grid[1]}" for p in plans)
        if label == "auto":
            label = f"auto ({engine.stage_memory_bytes / 2**30:.1f} GiB)"
        elif label != "one stage":
            label = f"{label} GiB"
        print(f"| {label} | {stages} | {seconds:.3f} s | {seconds / whole:.2f}× | {estimate.relative_time:.2f}× "
              f"| {estimate.peak_bytes / 2**30:.2f} GiB | {estimate.stage_map_bytes / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
