"""Time and memory of one U-Net segmentation training step: whole image vs ``stream_loss``.

    python benchmarks/segmentation_step.py --rows whole:2048 streamed:2048 whole:4096 streamed:8192

Every row runs in a fresh process: a float32 image and an 8-bit mask of ``size²`` pixels, a
``UNet`` (random weights), and a training step: per-pixel cross entropy, mean over the image,
backward into every parameter. ``whole`` is the conventional step on the whole image;
``streamed`` is ``StreamingCNN.stream_loss`` (forward, loss and backward tile by tile; the whole
output is never held). Each row reports the median step time (``--reps``, after one untimed
step), the process's peak RSS and how much the step added to what the process held before it
(model, image and mask, libraries). For 2048² the ratio streamed/whole is printed, both measured
in this run. On the CPU, RSS is the memory a user sees; on a GPU (``--device cuda``) the peak is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lightstream import StreamingCNN
from lightstream.models import UNet
from step_fixture import peak_memory, reset_peak

logger = logging.getLogger("segmentation_step")


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target.long(), reduction="none")


def worker(config: dict) -> dict:
    """One row, in this process: build, one untimed step, then ``reps`` timed steps."""
    torch.manual_seed(0)
    device, size = config["device"], config["size"]
    net = UNet(3, 2, depth=config["depth"], width=config["width"]).to(device)
    image = torch.randn(1, 3, size, size, device=device)
    mask = torch.randint(0, 2, (1, size, size), dtype=torch.uint8, device=device)
    tile_batch = config["tile_batch"] if config["tile_batch"] == "auto" else int(config["tile_batch"])
    scnn = StreamingCNN(net, tile_size=config["tile"], tile_batch=tile_batch) if config["mode"] == "streamed" else None

    def step() -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        if scnn is not None:
            return scnn.stream_loss(image, mask, _loss)
        loss = F.cross_entropy(net(image), mask.long())
        loss.backward()
        return loss.detach()

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if not config["reps"]:  # one step only: its peak over what the process held before it
        reset_peak(device)
        baseline = peak_memory(device)
        seconds = [timed()]
    else:
        timed()  # untimed: caches, first allocations
        reset_peak(device)
        baseline = peak_memory(device)
        seconds = [timed() for _ in range(config["reps"])]
    peak = peak_memory(device)
    tiles = len(scnn.plan(image.shape).tiles) if scnn is not None else 1
    return {**config, "seconds": statistics.median(seconds), "peak_gib": peak, "step_gib": peak - baseline,
            "tiles": tiles}


def run_row(mode: str, size: int, args: argparse.Namespace) -> dict:
    config = {"mode": mode, "size": size, "tile": args.tile, "device": args.device, "depth": args.depth,
              "width": args.width, "tile_batch": args.tile_batch,
              "reps": args.reps if size <= args.max_timed_size else 0}
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"row {mode} {size}² failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["whole:2048", "streamed:2048", "whole:4096",
                                                      "streamed:4096", "streamed:8192"],
                        help="mode:size pairs, each run in its own process")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--tile-batch", default="auto", help="StreamingCNN(tile_batch=): 'auto' or an integer")
    parser.add_argument("--max-timed-size", type=int, default=4096,
                        help="larger rows report their single step's time (no repetitions)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [run_row(mode, int(size), args) for mode, size in (row.split(":") for row in args.rows)]
    logger.info("UNet(depth=%d, width=%d), tile %d px, tile_batch=%s, %s, float32 image, 8-bit mask", args.depth,
                args.width, args.tile, args.tile_batch, torch.cuda.get_device_name() if args.device == "cuda" else "CPU")
    logger.info("%-9s %7s %6s %10s %10s %10s %8s", "mode", "size", "tiles", "step s", "peak GiB", "step GiB",
                "ratio")
    whole = {r["size"]: r["seconds"] for r in rows if r["mode"] == "whole"}
    for r in rows:
        ratio = r["seconds"] / whole[r["size"]] if r["mode"] == "streamed" and r["size"] in whole else None
        logger.info("%-9s %6d² %6d %10.2f %10.2f %10.2f %8s", r["mode"], r["size"], r["tiles"], r["seconds"],
                    r["peak_gib"], r["step_gib"], f"{ratio:.2f}×" if ratio else "")


if __name__ == "__main__":
    main()
