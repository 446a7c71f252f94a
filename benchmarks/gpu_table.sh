#!/usr/bin/env bash
# The README's GPU tables in one run: the CUDA tests; whole image vs ours vs the reference library
# (lightstream 1.0.7) for a ResNet-34 trunk at 4096², 8192² and 16384² with 2048-px tiles, in
# float32 and bf16-mixed (compare_reference.py: step time, torch.cuda.max_memory_allocated,
# gradients against the whole image's); one bf16-mixed step at 65536² from an 8-bit image in host
# memory (gigapixel_step.py); the stage_memory sweep at 8192². Run it on a CUDA machine from the
# repository root, with benchmarks/wheels filled by carry_wheels.sh (that machine has no network:
# the reference's environment is made there from them and its python3's torch, and the
# distributions of them that its python3 lacks, ipywidgets's, are installed to a temporary folder):
#
#     bash benchmarks/gpu_table.sh                      # everything
#     bash benchmarks/gpu_table.sh gigapixel tests      # or some parts, in the order given: tests, table
#                                                       # (or table-fp32, table-bf16), gigapixel, stage-memory
#     GPU_TABLE_SECONDS=540 bash benchmarks/gpu_table.sh tests table gigapixel   # all ended by then
#
# PYTHON=/path/to/python picks the interpreter (default .venv/bin/python, else python3). Whole-image
# steps predicted not to fit the card are skipped (90 % of its free memory). GPU_TABLE_SECONDS: a
# deadline for the whole run; a part still running then is stopped (with its processes), the parts
# after it are skipped, and each says so. A failing part does not stop the others; the exit status
# reports it. Each part prints its seconds.
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
deadline=${GPU_TABLE_SECONDS:-0}
timed() {  # timed PART COMMAND...: run it within the deadline, say how long it took
  local part=$1 start=$SECONDS limit=()
  shift
  if (( deadline > 0 )); then
    local left=$(( deadline - SECONDS ))
    if (( left < 30 )); then echo "# $part: skipped, GPU_TABLE_SECONDS=$deadline reached" >&2; status=1; return; fi
    limit=(timeout --kill-after=10 "$left")
  fi
  "${limit[@]}" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "# $part: stopped at the deadline (GPU_TABLE_SECONDS=$deadline)" >&2
  (( rc == 0 )) || status=1
  echo "# $part: $(( SECONDS - start )) s (rc $rc)"
}

wheels=benchmarks/wheels
if [ -d "$wheels" ]; then  # what this python lacks of them (the reference's own is set up apart)
  site=$(mktemp -d)
  missing=$("$PYTHON" - "$wheels" <<'PY'
import importlib.metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        if name != "lightstream":
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
PY
  )
  # shellcheck disable=SC2086
  [ -z "$missing" ] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" $missing \
    || echo "# could not install $missing" >&2
  export PYTHONPATH="$PYTHONPATH:$site"
else
  wheels=""  # then from PyPI
fi

reference_modes=""
table() {  # table DTYPE: whole image, ours and the reference, side by side
  if [ -z "$reference_modes" ]; then
    reference_modes="whole ours reference"
    BASE_PYTHON=$PYTHON WHEELS=$wheels bash benchmarks/reference/setup.sh \
      || { reference_modes="whole ours"; echo "# reference library not set up: its column is missing" >&2; status=1; }
  fi
  # shellcheck disable=SC2086
  timed "table $1" "$PYTHON" benchmarks/compare_reference.py --device cuda --model resnet34 \
    --size 4096 8192 16384 --tile 2048 --dtype "$1" --reps 2 --modes $reference_modes --timeout 300
}

for part in $parts; do
  case $part in
    tests)
      timed tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/modules/test_cuda_training.py \
        tests/widgets/test_memory_monitor.py tests/widgets/test_measured_peak.py ;;
    table) table fp32; table bf16 ;;
    table-fp32) table fp32 ;;
    table-bf16) table bf16 ;;
    gigapixel)
      # the memory a 24 GiB card's stage_memory="auto" allows (1.5 GiB), so the peak says whether it fits one
      timed gigapixel "$PYTHON" benchmarks/gigapixel_step.py --model resnet34 --size 65536 --tile 2048 --dtype bf16 \
        --stage-memory 1.5 ;;
    stage-memory)
      # the stage_memory trade-off at 8192² (the default "auto" vs 1 GiB, and one-piece streaming)
      timed stage-memory "$PYTHON" benchmarks/stage_memory.py --model resnet34 --size 8192 --tile 2048 \
        --stage-memory auto 1 ;;
    *) echo "# unknown part $part (parts: tests table table-fp32 table-bf16 gigapixel stage-memory)" >&2; status=1 ;;
  esac
done
exit $status
