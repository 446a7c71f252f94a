#!/usr/bin/env bash
# The wheels gpu_table.sh needs on the GPU machine, which cannot download (no network there), for
# its Python (3.12, x86-64): the reference library, lightstream 1.0.7 (pure Python, for
# reference/setup.sh; its torch, torchvision, lightning and numpy are that machine's own), and
# ipywidgets with what it needs (the memory monitor's GPU tests import lightstream.widgets). On that
# machine gpu_table.sh installs, of these, the distributions its python lacks. Run here, then carry
# the folder (it is git-ignored):
#
#     bash benchmarks/carry_wheels.sh                # -> benchmarks/wheels/
#     run(command="bash benchmarks/gpu_table.sh", carry=["benchmarks/wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
target=(--only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q "${target[@]}" --no-deps -d benchmarks/wheels "lightstream==1.0.7"
"$PYTHON" -m pip download -q "${target[@]}" -c requirements/pins.txt -d benchmarks/wheels ipywidgets openslide-python openslide-bin
du -sh benchmarks/wheels && ls benchmarks/wheels
