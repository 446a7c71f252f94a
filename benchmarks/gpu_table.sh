#!/usr/bin/env bash
# The README's GPU tables in one run of a few minutes: the CUDA tests, then whole image vs
# streamed training steps of a ResNet-34 trunk at 4096², 8192² and 16384², in float32 and
# bf16-mixed (step time and torch.cuda.max_memory_allocated), then the stage_memory sweep at
# 8192². Run it on a CUDA machine from the repository root:
#
#     bash benchmarks/gpu_table.sh            # PYTHON=/path/to/python to use another interpreter
#
# Whole-image steps predicted not to fit the card are skipped (90 % of its free memory). A failing
# test does not stop the table; the exit status reports it.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"
print("#", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' || exit 1
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/modules/test_cuda_training.py \
  tests/widgets/test_memory_monitor.py || status=1
for dtype in fp32 bf16; do
  "$PYTHON" benchmarks/train_step.py --model resnet34 --size 4096 8192 16384 --tile 2048 \
    --dtype "$dtype" --reps 2 --modes whole streamed --timeout 300 || status=1
done
# the stage_memory trade-off at 8192² (the default "auto" vs 1 GiB, and one-piece streaming)
"$PYTHON" benchmarks/stage_memory.py --model resnet34 --size 8192 --tile 2048 --stage-memory auto 1 || status=1
exit $status
