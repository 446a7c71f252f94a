"""Time and memory of one training step: whole image vs checkpointing vs streaming.

    python benchmarks/train_step.py --model resnet18 --size 2048 --tile 1024 --reps 3

Timing: the configurations run alternately, ``--reps`` times each, and the median is reported
with its ratio to the whole-image step (all measured in this one run). Memory: each
configuration runs once more in a fresh process, which reports its peak (process RSS on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU), and how much the step added to what the
process held before it (model, image, imported libraries); the estimate from the geometry is
printed next to it. Random weights; BatchNorm frozen (eval), as streaming requires.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision import models

from lightstream import StreamingCNN
from lightstream.core.memory import peak_rss, reset_peak_rss

MODES = ("whole", "checkpoint", "streamed-one-stage", "streamed")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(model: str, device: str, channels_last: bool) -> tuple[nn.Sequential, nn.Module]:
    net = getattr(models, model)(weights=None)
    trunk = nn.Sequential(*list(net.children())[:-2]).eval().to(device)
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(net.fc.in_features, 2)).to(device)
    return trunk, head


def step(mode: str, trunk: nn.Sequential, head: nn.Module, image: torch.Tensor, tile: int,
         amp: torch.dtype | None, engines: dict[str, StreamingCNN]) -> None:
    """One forward + backward of trunk and head (gradients accumulate; never stepped)."""
    device = image.device.type
    target = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
    with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
        if mode == "whole":
            fmap = trunk(image)
        elif mode == "checkpoint":
            fmap = image
            for child in trunk:
                fmap = checkpoint(child, fmap, use_reentrant=False) if any(
                    p.requires_grad for p in child.parameters()) else child(fmap)
        else:
            fmap = engines[mode].forward_autograd(image)
        loss = nn.functional.cross_entropy(head(fmap.float()), target)
    loss.backward()


def make_image(size: int, device: str, channels_last: bool) -> torch.Tensor:
    image = torch.randn(1, 3, size, size, device=device)
    return image.to(memory_format=torch.channels_last) if channels_last else image


def engines_for(trunk: nn.Sequential, tile: int) -> dict[str, StreamingCNN]:
    return {"streamed-one-stage": StreamingCNN(trunk, tile_size=tile, stages=None),
            "streamed": StreamingCNN(trunk, tile_size=tile)}  # the default: stages="auto"


def peak_memory(device: str) -> float:
    """Peak GiB since the last reset: CUDA allocations, or the process's RSS on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss() / 2**30


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif not reset_peak_rss():
        raise OSError("cannot reset the peak RSS (needs Linux /proc/self/clear_refs)")


def worker(args: argparse.Namespace) -> None:
    """Run one configuration once in this fresh process and print its peak memory as JSON."""
    torch.manual_seed(0)
    trunk, head = build(args.model, args.device, args.channels_last)
    image = make_image(args.size[0], args.device, args.channels_last)
    engines = engines_for(trunk, args.tile) if args.worker.startswith("streamed") else {}
    reset_peak(args.device)  # a fresh process may inherit its parent's peak RSS mark
    baseline = peak_memory(args.device)  # the process with model and image, before the step
    step(args.worker, trunk, head, image, args.tile, DTYPES[args.dtype], engines)
    print(json.dumps({"peak_gib": peak_memory(args.device), "step_gib": peak_memory(args.device) - baseline}))


def measure_memory(args: argparse.Namespace, mode: str, size: int) -> str:
    command = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--size", str(size),
               "--tile", str(args.tile), "--dtype", args.dtype, "--device", args.device]
    command += ["--channels-last"] if args.channels_last else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return "failed"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return f"{result['peak_gib']:.2f} GiB (step +{result['step_gib']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, nargs="+", default=[2048])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true",
                        help="trunk and image in channels-last memory format (all modes)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--max-whole-gib", type=float, default=16.0,
                        help="skip whole-image/checkpoint runs predicted to need more than this")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.manual_seed(0)
    trunk, head = build(args.model, args.device, args.channels_last)
    engines = engines_for(trunk, args.tile)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"# {args.model} trunk, tile {args.tile}, {args.dtype}, {layout}, {name}, torch {torch.__version__}")
    print("| image | mode | step (median) | ratio to whole | peak memory | estimate |")
    print("|---|---|---|---|---|---|")
    for size in args.size:
        shape = (1, 3, size, size)
        image = make_image(size, args.device, args.channels_last)
        estimates = {m: engines[m].estimate(shape) for m in engines}
        whole_gib = estimates["streamed"].whole_image_bytes / 2**30
        modes = [m for m in args.modes if m.startswith("streamed") or whole_gib <= args.max_whole_gib]
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.reps):
            for mode in modes:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(mode, trunk, head, image, args.tile, DTYPES[args.dtype], engines)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - start)
        base = statistics.median(times["whole"]) if "whole" in times else None
        for mode in args.modes:
            if mode not in times:
                print(f"| {size}² | {mode} | skipped: ~{whole_gib:.0f} GiB predicted | | | |")
                continue
            median = statistics.median(times[mode])
            ratio = f"{median / base:.2f}×" if base else "—"
            memory = "" if args.no_memory else measure_memory(args, mode, size)
            estimate = ""
            if mode in estimates:
                e = estimates[mode]
                estimate = f"{e.relative_time:.2f}×, {e.peak_bytes / 2**30:.2f} GiB"
            elif mode == "whole":
                estimate = f"{whole_gib:.2f} GiB"
            print(f"| {size}² | {mode} | {median:.2f} s | {ratio} | {memory} | {estimate} |", flush=True)


if __name__ == "__main__":
    main()
