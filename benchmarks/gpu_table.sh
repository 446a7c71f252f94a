#!/usr/bin/env bash
# The README's GPU tables in one run: the CUDA tests; whole image vs ours vs the reference library
# (lightstream 1.0.7) for a ResNet-34 trunk at 4096², 8192² and 16384² with 2048-px tiles, in
# float32 and bf16-mixed (compare_reference.py: step time, torch.cuda.max_memory_allocated,
# gradients against the whole image's); one bf16-mixed step at 65536² from an 8-bit image in host
# memory (gigapixel_step.py); the stage_memory sweep at 8192². Run it on a CUDA machine from the
# repository root, with benchmarks/reference/wheels filled by carry_wheels.sh (that machine
# has no network; the reference's environment is made there from them and its python3's torch):
#
#     bash benchmarks/gpu_table.sh                      # everything
#     bash benchmarks/gpu_table.sh tests table          # or some parts: tests table gigapixel stage-memory
#
# PYTHON=/path/to/python picks the interpreter (default .venv/bin/python, else python3). Whole-image
# steps predicted not to fit the card are skipped (90 % of its free memory). A failing part does not
# stop the others; the exit status reports it.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
parts=${*:-tests table gigapixel stage-memory}
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"
print("#", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' || exit 1
status=0
want() { [[ " $parts " == *" $1 "* ]]; }

if want tests; then
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/modules/test_cuda_training.py \
    tests/widgets/test_memory_monitor.py tests/widgets/test_measured_peak.py || status=1
fi
if want table; then
  modes="whole ours reference"
  wheels=benchmarks/reference/wheels
  [ -d "$wheels" ] || wheels=""  # then from PyPI
  BASE_PYTHON=$PYTHON WHEELS=$wheels bash benchmarks/reference/setup.sh || modes="whole ours"
  for dtype in fp32 bf16; do
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/compare_reference.py --device cuda --model resnet34 --size 4096 8192 16384 --tile 2048 \
      --dtype "$dtype" --reps 2 --modes $modes --timeout 300 || status=1
  done
  [ "$modes" = "whole ours reference" ] || { echo "# reference library not set up: its column is missing" >&2; status=1; }
fi
if want gigapixel; then
  # the memory a 24 GiB card's stage_memory="auto" allows (1.5 GiB), so the peak says whether it fits one
  "$PYTHON" benchmarks/gigapixel_step.py --model resnet34 --size 65536 --tile 2048 --dtype bf16 --stage-memory 1.5 \
    || status=1
fi
if want stage-memory; then
  # the stage_memory trade-off at 8192² (the default "auto" vs 1 GiB, and one-piece streaming)
  "$PYTHON" benchmarks/stage_memory.py --model resnet34 --size 8192 --tile 2048 --stage-memory auto 1 || status=1
fi
exit $status
