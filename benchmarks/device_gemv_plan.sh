#!/bin/bash
# One device call for a change of the decode-sized kernel's launch plan (native/cuda/gemv_plan.h):
# build with CUDA, every CUDA test, the kernel rows and the (warps, K splits, warps along K) sweep
# on the shapes the change touches (device_kernels.sh --gemv), then exllamav2 0.3.2 beside us on
# the same tensors (device_side_by_side.sh prep + kernels), with the decode-sized kernel's own time
# beside the path exl2_matmul takes. Carry .whl (benchmarks/fetch_device_wheels.sh fills it). The 8 files that come back: console.log,
# pytest.log, bench.log, bench.json, prep.log, sbs_console.log, kernels.md, kernels.json.
# GEMV_ARGS: kernels.py's arguments; SBS_MS: the side by side's token counts.
set -u
D=${OUT:-/tmp/exl2build-out}; mkdir -p "$D"
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
OUT=/tmp/dk SKIP_SANITIZER=1 SKIP_NCU=1 SKIP_DECODE=1 bash benchmarks/device_kernels.sh \
  ${GEMV_ARGS:---gemv --gemv-m 1,2,4,8 --shapes 4096x4096,4096x1024,2048x2048,14336x4096 --sweep-m 2,4,8 --sweep-bpw 2.5,4.0,6.0} \
  > "$D/console.log" 2>&1
cp /tmp/dk/bench.log /tmp/dk/bench.json /tmp/dk/pytest.log "$D/"
OUT=/tmp/sb SKIP_OURS_BUILD=1 STAGE=prep bash benchmarks/device_side_by_side.sh > /tmp/prep_console.log 2>&1
cp /tmp/sb/prep.log "$D/"
OUT=/tmp/sb STAGE=kernels STAGE_BUDGET_S=${SBS_BUDGET_S:-150} KERNELS_ARGS="--quick --no-gptq --ms ${SBS_MS:-1,2,4,8,16,32,2048}" \
  timeout $(( ${SBS_BUDGET_S:-150} + 20 )) bash benchmarks/device_side_by_side.sh > "$D/sbs_console.log" 2>&1
cp /tmp/sb/kernels.md /tmp/sb/kernels.json "$D/"
grep -E "passed|failed" "$D/pytest.log" | tail -2; tail -4 "$D/prep.log"; grep -E "M=" "$D/sbs_console.log" | cut -c1-160
