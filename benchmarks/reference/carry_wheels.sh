#!/usr/bin/env bash
# The wheels the GPU machine needs for the reference library's environment, which it cannot
# download (no network there): lightstream 1.0.7 (pure Python). Its other needs (torch,
# torchvision, lightning, numpy) are in that machine's python3 and are reused from there
# (see setup.sh). Run here, then carry the folder (it is git-ignored):
#
#     bash benchmarks/reference/carry_wheels.sh      # -> benchmarks/reference/wheels/
#     run(command="bash benchmarks/gpu_table.sh", carry=["benchmarks/reference/wheels"])
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d wheels "lightstream==1.0.7"
ls -l wheels
