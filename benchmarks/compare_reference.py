"""Side by side with the reference library: whole image vs ours vs DIAGNijmegen's lightstream 1.0.7.

    bash benchmarks/reference/setup.sh        # once: the reference library in .venv-reference
    python benchmarks/compare_reference.py --model resnet18 --size 2048 --tile 1024 1280 1536

For the same trunk (random weights, saved once and loaded by every process), 8-bit image, tile
size and precision, each configuration runs in a fresh process: the whole-image step, ours
(``StreamingCNN(trunk, tile_size=tile, mean=, std=)`` with its defaults, ``forward_autograd``)
and the reference's streaming (``reference/reference_worker.py``, in its own virtual environment,
since it shares our package's name and its hooks rewrite the trunk's modules). Each process runs
one untimed step, whose trunk gradients and feature map are compared with the whole image's (the
largest difference relative to the largest value of each), then ``--reps`` timed steps (the
median is reported, with its ratio to the whole-image step) and their peak memory: the process's
peak RSS on the CPU (in brackets what the steps added to the process holding the model, the
image and the libraries), ``torch.cuda.max_memory_allocated`` on a GPU. On the CPU each
configuration runs once more with glibc's mmap threshold fixed at 64 KiB, so that freed tensors
leave the RSS at once: what that step adds is its tensors (as in ``train_step.py``). BatchNorm is
frozen (eval mode, no gradients for its parameters) in every mode, as the reference's users do.
The head is ``train_step.py``'s (max-pool, linear); ``--dtype bf16`` runs every mode under
autocast (bf16-mixed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch
from torch import nn

from lightstream import StreamingCNN
from step_fixture import DTYPES, MEAN, STD, build, make_image, normalise, run_worker

HERE = Path(__file__).resolve().parent
REFERENCE_WORKER = HERE / "reference" / "reference_worker.py"
REFERENCE_PYTHON = HERE.parent / ".venv-reference" / "bin" / "python"


def make_step(trunk: nn.Sequential, head: nn.Module, image: torch.Tensor, config: dict):
    """One step of the whole image (``config["mode"] == "whole"``) or of our default ``StreamingCNN``."""
    device, amp = config["device"], DTYPES[config["dtype"]]
    target = torch.zeros(image.shape[0], dtype=torch.long, device=device)
    if config["mode"] == "whole":
        def trunk_output() -> torch.Tensor:
            return trunk(normalise(image))
    else:
        engine = StreamingCNN(trunk, tile_size=config["tile"], mean=MEAN, std=STD)
        for plan in engine.stage_plans(image.shape):  # plan outside the timed steps
            assert plan.batches and plan.forward_batches

        def trunk_output() -> torch.Tensor:
            return engine.forward_autograd(image)

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            fmap = trunk_output()
            loss = nn.functional.cross_entropy(head(fmap.float()), target)
        loss.backward()
        return fmap

    return step


def run(mode: str, config: dict, timeout: int, release_freed: bool = False) -> dict | str:
    """Measure ``mode`` in a fresh process: its JSON result, or why it failed.

    ``release_freed``: fix glibc's mmap threshold, so freed tensors leave the RSS at once.
    """
    config = dict(config, mode=mode, save_whole=mode == "whole")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if release_freed else dict(os.environ)
    if mode == "reference":
        env.pop("PYTHONPATH", None)  # ours must not shadow the reference package
        command = [str(REFERENCE_PYTHON), str(REFERENCE_WORKER), json.dumps(config)]
    else:
        command = [sys.executable, str(HERE / "compare_reference.py"), "--worker", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=Path(config["fixture"]).parent)
    except subprocess.TimeoutExpired:
        return f"over {timeout} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        print(f"# {mode} failed: {lines[-1] if lines else done.returncode}", file=sys.stderr)
        return "failed"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, nargs="+", default=[2048])
    parser.add_argument("--tile", type=int, nargs="+", default=[1024, 1280, 1536])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp32, or bf16/fp16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per configuration (after one untimed)")
    parser.add_argument("--modes", nargs="+", choices=["whole", "ours", "reference"],
                        default=["whole", "ours", "reference"])
    parser.add_argument("--no-tensors", action="store_true",
                        help="on the CPU, skip the second run that measures the step's tensors")
    parser.add_argument("--max-whole-gib", type=float, default=None,
                        help="skip whole-image steps predicted to need more (default: 90%% of free memory)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker), make_step)
        return
    if "reference" in args.modes and not REFERENCE_PYTHON.exists():
        parser.error(f"{REFERENCE_PYTHON} not found: run `bash benchmarks/reference/setup.sh` first")
    cpu = args.device == "cpu"
    if args.max_whole_gib is None:
        free = psutil.virtual_memory().available if cpu else torch.cuda.mem_get_info()[0]
        args.max_whole_gib = 0.9 * free / 2**30
    name = f"CPU ({torch.get_num_threads()} threads)" if cpu else torch.cuda.get_device_name()
    print(f"# {args.model} trunk, {args.dtype}, uint8 input, BatchNorm frozen, {name}, torch {torch.__version__}; "
          f"median of {args.reps} steps after one untimed step, each configuration in a fresh process")
    columns = table_columns(cpu)
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    results = []
    with tempfile.TemporaryDirectory(prefix="compare_reference_") as tmp:
        for size in args.size:
            torch.manual_seed(0)
            trunk, head = build(args.model, "cpu")
            fixture = Path(tmp) / f"fixture_{size}.pt"
            torch.save({"trunk": trunk.state_dict(), "head": head.state_dict(),
                        "image": make_image(size, "cpu")}, fixture)
            config = {"model": args.model, "device": args.device, "dtype": args.dtype, "reps": args.reps,
                      "fixture": str(fixture), "whole": str(Path(tmp) / f"whole_{size}.pt")}
            shape, dtype = (1, 3, size, size), DTYPES[args.dtype] or torch.float32
            whole_gib = StreamingCNN(trunk, tile_size=args.tile[0]).estimate(shape, dtype).whole_image_bytes / 2**30
            base = None
            if "whole" in args.modes:
                if whole_gib > args.max_whole_gib:
                    print_row(cpu, [f"{size}²", "", "whole", f"skipped: ~{whole_gib:.0f} GiB predicted"])
                else:
                    result = measure_row(args, "whole", dict(config, tile=args.tile[0]), None, "", size, "")
                    base = result["seconds"] if isinstance(result, dict) else None
                    results.append(result)
            for tile in args.tile:
                estimate = StreamingCNN(trunk, tile_size=tile).estimate(shape, dtype)
                for mode in [m for m in ("ours", "reference") if m in args.modes]:
                    predicted = (f"{estimate.relative_time:.2f}×, {estimate.peak_bytes / 2**30:.2f} GiB"
                                 if mode == "ours" else "")
                    results.append(measure_row(args, mode, dict(config, tile=tile), base, str(tile), size, predicted))
    if any(isinstance(result, str) for result in results):
        sys.exit("# a row failed or ran out of time (see above)")


def measure_row(args: argparse.Namespace, mode: str, config: dict, base: float | None, tile: str, size: int,
                predicted: str) -> dict | str:
    """Run ``mode`` (twice on the CPU: default allocator, then freed memory released) and print its row."""
    cpu = args.device == "cpu"
    result = run(mode, config, args.timeout)
    cells = [f"{size}²", tile, "ours (default)" if mode == "ours" else mode]
    if isinstance(result, str):
        print_row(cpu, [*cells, result])
        return result
    cells += [f"{result['seconds']:.2f} s", "1.00×" if mode == "whole" else f"{result['seconds'] / base:.2f}×" if base else "—",
              f"{result['peak_gib']:.2f} GiB (+{result['step_gib']:.2f})"]
    if cpu:
        tensors = "" if args.no_tensors else run(mode, dict(config, reps=1), args.timeout, release_freed=True)
        cells.append(f"+{tensors['step_gib']:.2f} GiB" if isinstance(tensors, dict) else tensors)
    for key in ("grad_diff", "fmap_diff"):
        cells.append("" if mode == "whole" else "—" if result[key] is None else f"{result[key]:.1e}")
    cells.append(predicted)
    print_row(cpu, cells)
    return result


def table_columns(cpu: bool) -> list[str]:
    return ["image", "tile", "mode", "step", "ratio to whole",
            *(["peak RSS (step)", "step's tensors"] if cpu else ["max allocated (step)"]),
            "trunk grads vs whole", "output vs whole", "estimate (ratio, peak)"]


def print_row(cpu: bool, cells: list[str]) -> None:
    """One table row, empty cells added up to the table's width."""
    cells = cells + [""] * (len(table_columns(cpu)) - len(cells))
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
