"""Slide I/O benchmark: tile read throughput through ``Slide.read``, and the memory of streaming a slide.

Writes a synthetic pyramidal TIFF (or uses ``--slide``), then prints:

* write time and file size of the synthetic slide;
* decoded-RGB throughput (MB/s) of reading every ``--tile`` tile of a level in raster order, and of
  reading randomly placed tiles, through :meth:`lightstream.data.Slide.read`;
* if the engine is importable: time and peak resident memory (RSS) of streaming a forward pass
  of a small CNN trunk over the whole level, next to what the level would take in memory.

Numbers only; nothing is asserted. A quick run: ``python benchmarks/slide_io.py --size 8192``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightstream.data import open_slide, write_synthetic_slide

try:
    import psutil
except ImportError:  # fall back to the process-lifetime peak from getrusage
    psutil = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32768, help="side of the synthetic slide's level 0 (px)")
    parser.add_argument("--slide", type=Path, help="benchmark this slide instead of writing a synthetic one")
    parser.add_argument("--level", type=int, default=0, help="pyramid level to read and stream")
    parser.add_argument("--tile", type=int, default=512, help="side of the tiles read (px)")
    parser.add_argument("--random-tiles", type=int, default=256, help="number of randomly placed tiles to read")
    parser.add_argument("--compression", default="jpeg", help="codec of the synthetic slide: jpeg, zlib, lzw")
    parser.add_argument("--stream-tile", type=int, default=2048, help="engine tile size for the streaming pass")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lightstream-bench-") as workdir:
        path = args.slide or _write_slide(Path(workdir) / "bench.tif", args.size, args.compression)
        _read_throughput(path, args.level, args.tile, args.random_tiles)
        if not args.no_stream:
            _stream_memory(path, args.level, args.stream_tile, torch.device(args.device))


def _write_slide(path: Path, size: int, compression: str) -> Path:
    start = time.perf_counter()
    info = write_synthetic_slide(path, size=(size, size), lesions=3, seed=0, compression=compression)
    seconds = time.perf_counter() - start
    megapixels = sum(h * w for h, w in info.level_shapes) / 1e6
    print(f"wrote {size}x{size} synthetic slide ({len(info.level_shapes)} levels, {compression}): "
          f"{seconds:.1f} s, {megapixels / seconds:.0f} MP/s, {path.stat().st_size / 1e6:.0f} MB on disk")
    return path


def _read_throughput(path: Path, level: int, tile: int, random_tiles: int) -> None:
    with open_slide(path, level=level) as slide:
        _, _, height, width = slide.shape
        print(f"reading {slide}")
        corners = [(r, c) for r in range(0, height, tile) for c in range(0, width, tile)]
        _time_reads(slide, corners, tile, "raster order")
        rng = np.random.default_rng(0)
        corners = [
            (int(rng.integers(0, max(height - tile, 1))), int(rng.integers(0, max(width - tile, 1))))
            for _ in range(random_tiles)
        ]
        _time_reads(slide, corners, tile, "random places")


def _time_reads(slide, corners: list[tuple[int, int]], tile: int, order: str) -> None:
    decoded = 0
    start = time.perf_counter()
    for row, col in corners:
        decoded += slide.read(slice(row, row + tile), slice(col, col + tile)).numel()
    seconds = time.perf_counter() - start
    print(f"  {len(corners)} tiles of {tile}x{tile}, {order}: {decoded / 1e6 / seconds:.0f} MB/s decoded RGB, "
          f"{len(corners) / seconds:.0f} tiles/s")


def _stream_memory(path: Path, level: int, tile_size: int, device: torch.device) -> None:
    try:
        from lightstream import StreamingCNN
    except ImportError:
        print("lightstream.StreamingCNN is not available: skipping the streaming pass")
        return
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
    ).to(device).eval()
    scnn = StreamingCNN(trunk, tile_size=tile_size, mean=[200.0] * 3, std=[50.0] * 3)
    with open_slide(path, level=level) as slide:
        _, _, height, width = slide.shape
        with _PeakRss() as rss:
            start = time.perf_counter()
            fmap = scnn(slide)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
    print(f"streamed forward over {height}x{width} px (tile {tile_size}, {len(scnn.plan((height, width)))} tiles, "
          f"{device}): {seconds:.1f} s, feature map {tuple(fmap.shape)}")
    print(f"  peak RSS {rss.peak / 2**20:.0f} MiB ({(rss.peak - rss.baseline) / 2**20:+.0f} MiB over the "
          f"{rss.baseline / 2**20:.0f} MiB before the pass); the level in memory would take "
          f"{height * width * 3 / 2**20:.0f} MiB as uint8, {height * width * 3 * 4 / 2**20:.0f} MiB as float32")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


class _PeakRss:
    """Resident memory before a block and its peak during it (sampled every 5 ms with psutil)."""

    def __enter__(self) -> _PeakRss:
        self.baseline = self._rss()
        self.peak = self.baseline
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._sampler.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        if psutil is not None:
            return psutil.Process().memory_info().rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB, lifetime peak


if __name__ == "__main__":
    main()
