"""How long a tile-size change takes to plan: what the tile tuner's slider waits for.

    python benchmarks/tile_geometry.py --model resnet50 --size 16384 12288

Builds the trunk (random weights), then times its first plan (the trace and the shape-only probe
of the layers' costs happen here, once) and then, for each tile size, its first plan and per-layer
profile (later ones are cached). ``tests/core/test_geometry.py`` proves why the later
ones are fast (no tensor operation, no new probe); this script says how fast, on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchvision import models

from lightstream import StreamingCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision ResNet")
    parser.add_argument("--size", type=int, nargs=2, default=[16384, 12288], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--tiles", type=int, nargs="+", default=[600, 1000, 1500, 2600, 4096],
                        help="the first is planned with the trace and probe")
    args = parser.parse_args()
    trunk = nn.Sequential(*list(getattr(models, args.model)(weights=None).children())[:-2]).eval()

    start = time.perf_counter()
    scnn = StreamingCNN(trunk, tile_size=args.tiles[0], stages=None)
    scnn.plan(tuple(args.size))
    first = time.perf_counter() - start
    print(f"# {args.model}, {args.size[0]}x{args.size[1]} px, one stage, torch {torch.__version__}")
    print(f"first plan (trace and probe): {first * 1000:.0f} ms")
    print("| tile | plan + profile | tiles |")
    print("|---|---|---|")
    for tile in args.tiles[1:]:
        start = time.perf_counter()
        scnn.tile_size = tile
        plan = scnn.plan(tuple(args.size))
        scnn.geometry.profile(tile)
        print(f"| {tile} | {(time.perf_counter() - start) * 1000:.1f} ms | {len(plan)} |")


if __name__ == "__main__":
    main()
