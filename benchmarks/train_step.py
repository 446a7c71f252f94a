"""Time and memory of one training step: whole image vs checkpointing vs streaming.

    python benchmarks/train_step.py --model resnet18 --size 2048 --tile 1024 --reps 3

Timing: the configurations run alternately, ``--reps`` times each, after one untimed step each
(which selects a GPU's kernels, creates the CPU's oneDNN primitives and grows the allocator's
heap: the first step of a process runs up to 1.6× slower on the CPU), and the median is
reported with its ratio to the whole-image step (all measured in this one run), next to the
estimated ratio
(``StreamingCNN.estimate``). On the CPU the CPU-seconds of a step in user and kernel mode are
printed too, with the estimate's fresh memory beside the memory the step faulted in (minor page
faults): kernel time is mostly page faults, because tensors past glibc's mmap threshold (32 MiB
at most) are fresh memory on every allocation, which the whole-image step pays for gigabytes a
step (the estimate's CPU time model charges for it), and because the streamed step returns the
heap's free pages after each stage and after each run of a stage whose runs are large
(``release_host_memory``), whose next runs fault them back in (the estimate charges each such
run's working set).

Memory: each configuration runs once more in a fresh process, which reports its peak (process
RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU), and how much the step added to
what the process held before it (model, image, imported libraries). On the CPU it runs twice:
with the default allocator (the RSS a user sees: glibc keeps freed heap pages, often +40-80 %
over the tensors alive), and with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so
that every freed tensor returns to the system at once and the RSS tracks the tensors alive: the
CPU's counterpart of ``max_memory_allocated``, and what the estimate from the geometry
(``StreamingCNN.estimate``) predicts. That run, and the GPU's, measure a second step (the first
compiles kernels and fills caches, once per process). ``--reps 0`` skips the timing loop and
reports the fresh process's single step time instead (for images too large to run twice).

Dispatched operations: one more step of each configuration, untimed, runs under a
``TorchDispatchMode`` that counts the aten operations it dispatches, forward and backward
(``dispatch_count.py``; on a GPU nearly every one is a kernel launch, so this shows the per-tile
overhead on any device). The column gives the count and its ratio to the whole-image step's;
``--ops-breakdown`` prints the ten most frequent operations of each configuration after the
table, ``--no-ops`` skips the count.

The image is 8-bit by default, as slides and photographs are: the whole-image and checkpoint
steps normalise it to float on the device inside the step, the streamed steps normalise each
tile (``StreamingCNN(mean=, std=)``); ``--input float32`` hands every mode a float image.
Random weights; BatchNorm frozen (eval), as streaming requires.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import NamedTuple

import psutil
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dispatch_count import DispatchCounter, format_count
from lightstream import StreamingCNN, TileTooSmallError
from step_fixture import DTYPES, MEAN, STD, build, make_image, normalise, peak_memory, reset_peak

MODES = ("whole", "checkpoint", "streamed-one-stage", "streamed")


class StepTime(NamedTuple):
    """One step: wall-clock seconds, the CPU-seconds of this process in user and kernel mode, and
    the memory it faulted in (minor page faults: fresh pages the kernel mapped and zeroed)."""

    wall: float
    user: float
    system: float
    faulted_bytes: int


def step(mode: str, trunk: nn.Sequential, head: nn.Module, image: torch.Tensor, tile: int,
         amp: torch.dtype | None, engines: dict[str, StreamingCNN]) -> None:
    """One forward + backward of trunk and head (gradients accumulate; never stepped)."""
    device = image.device.type
    target = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
    if not mode.startswith("streamed") and not image.is_floating_point():
        image = normalise(image)
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


def engines_for(trunk: nn.Sequential, tile: int, kind: str) -> dict[str, StreamingCNN]:
    """Streaming with one stage and with the default (``stages="auto"``)."""
    norm = {"mean": MEAN, "std": STD} if kind == "uint8" else {}
    engines = {"streamed": StreamingCNN(trunk, tile_size=tile, **norm)}
    try:
        engines["streamed-one-stage"] = StreamingCNN(trunk, tile_size=tile, stages=None, **norm)
    except TileTooSmallError as error:
        logging.warning("streamed-one-stage skipped: %s", error)
    return engines


def worker(args: argparse.Namespace) -> None:
    """Run one configuration once in this fresh process and print its peak memory as JSON."""
    torch.manual_seed(0)
    trunk, head = build(args.model, args.device, args.channels_last)
    image = make_image(args.size[0], args.device, args.channels_last, args.input)
    engines = engines_for(trunk, args.tile, args.input) if args.worker.startswith("streamed") else {}
    if args.worker in engines:
        for plan in engines[args.worker].stage_plans(image.shape):  # plan outside the measured step
            assert plan.batches and plan.forward_batches
    if args.warmup:  # a first step compiles kernels and fills caches: measure the second one
        timed_step(args.worker, trunk, head, image, args, engines)
        trunk.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
    reset_peak(args.device)  # a fresh process may inherit its parent's peak RSS mark
    baseline = peak_memory(args.device)  # the process with model and image, before the step
    seconds = timed_step(args.worker, trunk, head, image, args, engines)
    peak = peak_memory(args.device)
    print(json.dumps({"peak_gib": peak, "step_gib": peak - baseline, "seconds": seconds}))


def measure_memory(args: argparse.Namespace, mode: str, size: int, release_freed: bool = False
                   ) -> dict[str, float] | None:
    """Peak memory (and the step time) of one step of ``mode`` in a fresh process.

    ``release_freed``: fix glibc's mmap threshold, so freed tensors leave the RSS at once.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if release_freed else None
    if args.device == "cuda":
        torch.cuda.empty_cache()  # this process's cached blocks would crowd the fresh one out
    command = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--size", str(size),
               "--tile", str(args.tile), "--dtype", args.dtype, "--device", args.device,
               "--input", args.input]
    command += ["--warmup"] if release_freed or args.device == "cuda" else []
    command += ["--channels-last"] if args.channels_last else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, nargs="+", default=[2048])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="fp32, or bf16/fp16 autocast (mixed precision)")
    parser.add_argument("--input", choices=["uint8", "float32"], default="uint8",
                        help="the image handed to the step (see the module docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per mode (0: memory runs only)")
    parser.add_argument("--channels-last", action="store_true",
                        help="trunk and image in channels-last memory format (all modes)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--no-ops", action="store_true", help="skip counting dispatched operations")
    parser.add_argument("--ops-breakdown", action="store_true",
                        help="after the table, the ten most frequent operations of each configuration")
    parser.add_argument("--max-whole-gib", type=float, default=None,
                        help="skip whole-image/checkpoint runs predicted to need more than this "
                             "(default: 90%% of the device's free memory)")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reps == 0 and args.no_memory and args.no_ops:
        parser.error("--reps 0 with --no-memory and --no-ops measures nothing")
    if args.worker:
        worker(args)
        return
    if args.max_whole_gib is None:
        free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else psutil.virtual_memory().available
        args.max_whole_gib = 0.9 * free / 2**30
    torch.manual_seed(0)
    trunk, head = build(args.model, args.device, args.channels_last)
    engines = engines_for(trunk, args.tile, args.input)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"# {args.model} trunk, tile {args.tile}, {args.dtype}, {args.input} input, {layout}, {name}, "
          f"torch {torch.__version__}")
    cpu = args.device == "cpu"
    columns = ["image", "mode", "step", "ratio to whole", *([] if args.no_ops else ["aten ops (× whole)"]),
               *(["CPU-s user + sys"] if cpu else []), "estimated ratio",
               *(["fresh memory (est.)", "faulted in (measured)"] if cpu else []),
               *(["peak RSS (step)", "step's tensors (freed memory released)"] if cpu else
                 ["step's tensors (max allocated)"]), "estimated"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    dtype = DTYPES[args.dtype] or torch.float32
    breakdowns: dict[str, dict[str, Counter[str]]] = {}
    for size in args.size:
        shape = (1, 3, size, size)
        estimates = {m: engines[m].estimate(shape, dtype) for m in engines}
        whole_gib = estimates["streamed"].whole_image_bytes / 2**30
        modes = [m for m in args.modes if m in engines or (not m.startswith("streamed")
                                                             and whole_gib <= args.max_whole_gib)]
        image = make_image(size, args.device, args.channels_last, args.input)
        timings = time_steps(args, trunk, head, engines, image, modes) if args.reps else {}
        ops = {} if args.no_ops else count_ops(args, trunk, head, engines, image, modes)
        breakdowns[f"{size}²"] = ops
        del image
        times = {m: [t.wall for t in ts] for m, ts in timings.items()}
        user = {m: statistics.median(t.user for t in ts) for m, ts in timings.items()}
        system = {m: statistics.median(t.system for t in ts) for m, ts in timings.items()}
        faulted = {m: statistics.median(t.faulted_bytes for t in ts) for m, ts in timings.items()}
        base = statistics.median(times["whole"]) if "whole" in times else None
        for mode in args.modes:
            if mode not in modes:
                why = "tile below its receptive field" if mode.startswith("streamed") else \
                    f"~{whole_gib:.0f} GiB predicted"
                print(f"| {size}² | {mode} | skipped: {why} |" + " |" * (len(columns) - 3))
                continue
            memory = None if args.no_memory else measure_memory(args, mode, size)
            live = memory if not cpu or memory is None else measure_memory(args, mode, size, True)
            if mode in times:
                seconds = f"{statistics.median(times[mode]):.2f} s"
            else:
                seconds = f"{memory['seconds']:.1f} s (one step)" if memory else "—" if args.no_memory else "failed"
            ratio = f"{statistics.median(times[mode]) / base:.2f}×" if base and mode in times else "—"
            predicted_ratio, predicted, fresh = "", None, None
            if mode in estimates:
                predicted_ratio = f"{estimates[mode].relative_time:.2f}×"
                predicted = estimates[mode].peak_bytes / 2**30
                fresh = estimates[mode].fresh_bytes
            elif mode == "whole":
                predicted = whole_gib
                fresh = estimates["streamed"].whole_image_fresh_bytes
            cells = [f"{size}²", mode, seconds, ratio]
            if not args.no_ops:
                total = sum(ops[mode].values())
                whole_ops = sum(ops["whole"].values()) if "whole" in ops else None
                cells.append(format_count(total) + (f" ({total / whole_ops:.1f}×)" if whole_ops else ""))
            if cpu:
                cells.append(f"{user[mode]:.1f} + {system[mode]:.1f}" if mode in user else "")
            cells.append(predicted_ratio)
            if cpu:
                cells.append("" if fresh is None else f"{fresh / 2**30:.2f} GiB")
                cells.append(f"{faulted[mode] / 2**30:.2f} GiB" if mode in faulted else "")
                cells.append(f"{memory['peak_gib']:.2f} GiB (+{memory['step_gib']:.2f})" if memory else
                             "" if args.no_memory else "failed")
            cells.append(f"+{live['step_gib']:.2f} GiB" if live else "" if args.no_memory else "failed")
            estimate = "" if predicted is None else f"{predicted:.2f} GiB"
            if predicted is not None and live:
                estimate += f" ({predicted / live['step_gib'] - 1:+.0%})"
            cells.append(estimate)
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.ops_breakdown:
        for image_size, ops in breakdowns.items():
            print_breakdown(f"{image_size}, tile {args.tile}", ops)


def count_ops(args: argparse.Namespace, trunk: nn.Sequential, head: nn.Module,
              engines: dict[str, StreamingCNN], image: torch.Tensor, modes: list[str]) -> dict[str, Counter[str]]:
    """The aten operations one step of each mode dispatches, by name (an untimed step each)."""
    ops = {}
    for mode in modes:
        with DispatchCounter() as counter:
            step(mode, trunk, head, image, args.tile, DTYPES[args.dtype], engines)
        ops[mode] = counter.counts
    return ops


def print_breakdown(title: str, ops: dict[str, Counter[str]], top: int = 10) -> None:
    """A table of each mode's ``top`` most frequent operations (the union of them, as rows)."""
    names = sorted({name for counts in ops.values() for name, _ in counts.most_common(top)},
                   key=lambda name: -max(counts[name] for counts in ops.values()))
    print(f"\n# dispatched operations per step, {title}: the {top} most frequent of each mode")
    print("| operation | " + " | ".join(ops) + " |")
    print("|---" * (len(ops) + 1) + "|")
    print("| **all** | " + " | ".join(str(sum(counts.values())) for counts in ops.values()) + " |")
    for name in names:
        print(f"| `{name}` | " + " | ".join(str(counts[name]) for counts in ops.values()) + " |")


def time_steps(args: argparse.Namespace, trunk: nn.Sequential, head: nn.Module,
               engines: dict[str, StreamingCNN], image: torch.Tensor, modes: list[str]) -> dict[str, list[StepTime]]:
    """``--reps`` step times per mode, the modes alternating, after one untimed step each."""
    times: dict[str, list[StepTime]] = {m: [] for m in modes}
    for mode in modes:  # a process's first step of a shape selects kernels and grows the heap: not timed
        timed_step(mode, trunk, head, image, args, engines)
    for _ in range(args.reps):
        for mode in modes:
            before, faults_before = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall = timed_step(mode, trunk, head, image, args, engines)
            after, faults_after = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[mode].append(StepTime(wall, after.user - before.user, after.system - before.system,
                                        (faults_after - faults_before) * resource.getpagesize()))
    return times


def timed_step(mode: str, trunk: nn.Sequential, head: nn.Module, image: torch.Tensor,
               args: argparse.Namespace, engines: dict[str, StreamingCNN]) -> float:
    """Seconds of one :func:`step` (the device synchronised before and after)."""
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(mode, trunk, head, image, args.tile, DTYPES[args.dtype], engines)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
