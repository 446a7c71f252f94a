#!/usr/bin/env bash
# The README's GPU table in one run of a few minutes: the CUDA tests, then whole image vs
# streamed training steps of a ResNet-34 trunk at 4096², 8192² and 16384², in float32 and
# bf16-mixed (step time and torch.cuda.max_memory_allocated), and one streamed step in bf16
# with a float64 exactness check on the GPU. Run it on a CUDA machine from the repository root:
#
#     bash benchmarks/gpu_table.sh            # PYTHON=/path/to/python to use another interpreter
#
# Whole-image steps that would not fit the card are skipped (--max-whole-gib).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("#", torch.cuda.get_device_name())'
"$PYTHON" -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/widgets/test_memory_monitor.py
free_gib=$("$PYTHON" -c 'import torch; print(int(torch.cuda.mem_get_info()[0] / 2**30 * 0.9))')
for dtype in fp32 bf16; do
  "$PYTHON" benchmarks/train_step.py --model resnet34 --size 4096 8192 16384 --tile 2048 \
    --dtype "$dtype" --reps 2 --modes whole streamed --max-whole-gib "$free_gib"
done
