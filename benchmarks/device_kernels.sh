#!/bin/bash
# One device call: build + install the checkout with CUDA (sm_90), run the CUDA kernel tests,
# the kernel benchmarks, and compute-sanitizer over a pass through every kernel.
# Logs land in $OUT (build.log, pytest.log, bench.log, bench.md, bench.json, decode_ops.log, sanitize_<tool>.log).
# Usage on the device machine, from the repository root: bash benchmarks/device_kernels.sh [--quick]
# (PREBUILT_WHEEL=path installs that wheel instead of building; SKIP_SANITIZER=1 skips the compute-sanitizer passes, SKIP_NCU=1 the Nsight Compute pass, SKIP_BENCH=1 kernels.py,
# SKIP_DECODE=1 decode_ops.py;
# PYTEST_K selects tests by -k expression; NCU_KERNEL (default exl2_gemv) names the profiled kernel, NCU_COUNT how many
# launches of it, PROFILE_BPW the decode-sized kernel's bpws in launch order, e.g. 2.5,4.0,6.0, PROFILE_SHAPE
# its K x N (default 4096x14336), NCU_ARGS more ncu arguments, e.g. --print-details all or --metrics ...;
# NCU_SOURCE='4096x4096 8192x28672' also writes per-SASS-instruction counts and stall samples, ncu_source_<shape>.csv).
set -u -o pipefail
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/exl2build-out}
mkdir -p "$OUT"
PY=${PY:-python3}
cd "$REPO"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"

# The CLI's configuration stack, for the forward/generation tests (the machine has no index):
# the wheels carried in .whl/ whose import fails.
want=""
for pair in hydra:hydra_core omegaconf:omegaconf antlr4:antlr4 gguf:gguf; do
  (cd /tmp && $PY -c "import ${pair%%:*}") 2>/dev/null && continue
  f=$(ls .whl/${pair#*:}[-_]* 2>/dev/null | head -1); [ -n "$f" ] && want="$want $f"
done
[ -n "$want" ] && $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir $want > "$OUT/wheels.log" 2>&1

echo "== build $(date -u +%T)"
t0=$(date +%s)
if [ -n "${PREBUILT_WHEEL:-}" ] && ! bash benchmarks/tree_digest.sh . --matches "$(dirname "$PREBUILT_WHEEL")/DIGEST"; then
  echo "$PREBUILT_WHEEL is stale (the tree changed after benchmarks/build_device_wheel.sh): building instead"; PREBUILT_WHEEL=""
fi
if [ -n "${PREBUILT_WHEEL:-}" ]; then
  # A cp312 wheel of this tree built on the CPU machine (benchmarks/build_device_wheel.sh): it installs
  # in seconds instead of a ~2-minute CUDA build of device time.
  $PY -m pip install --no-deps --no-cache-dir --force-reinstall "$PREBUILT_WHEEL" > "$OUT/build.log" 2>&1
else
  EXL2BUILD_CUDA=ON EXL2BUILD_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 \
    timeout 300 $PY -m pip install --no-build-isolation --no-deps --no-cache-dir . > "$OUT/build.log" 2>&1
fi
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; exit 1; fi

# Run from outside the checkout so `import exl2build` finds the installed package.
cd /tmp
$PY -c "import exl2build._native as n; print('built_with_cuda', n.built_with_cuda, 'SMs', n.cuda.device_sm_count())"

echo "== pytest $(date -u +%T)"
# Every CUDA-marked test (kernels, forward pass, generation), unless PYTEST_FILES narrows it.
timeout 240 $PY -m pytest ${PYTEST_FILES:-$REPO/tests} -m cuda -q -n 16 -p no:cacheprovider --rootdir "$REPO" ${PYTEST_K:+-k "$PYTEST_K"} \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/pytest.log"

echo "== bench $(date -u +%T)"
[ -n "${SKIP_BENCH:-}" ] || timeout 300 $PY "$REPO/benchmarks/kernels.py" "$@" --out "$OUT/bench.md" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -v "^|" "$OUT/bench.log" | head -80

echo "== decode operators $(date -u +%T)"
# SmolLM2 shapes in FP16 (the launch count), then EXL2 decoders: SmolLM2 and Llama-2-7B shapes at 4.0 bpw.
: > "$OUT/decode_ops.log"
# The 7B case also without programmatic dependent launch (EXL2BUILD_NO_PDL=1), for the A/B.
# And with SDPA in place of the decode-attention kernel (--sdpa), at the default 272 and at position 2048 of a 4096-token cache.
# DECODE_PRESETS: the decode_ops.py argument lists, separated by ';'.
IFS=';' read -ra presets <<< "${DECODE_PRESETS:-smollm2;smollm2 --exl2 4.0;llama2-7b --exl2 4.0;NO_PDL llama2-7b --exl2 4.0;llama2-7b --exl2 4.0 --sdpa;llama2-7b --exl2 4.0 --cache-len 4096 --start 2048;llama2-7b --exl2 4.0 --cache-len 4096 --start 2048 --sdpa}"
[ -n "${SKIP_DECODE:-}" ] && presets=()
for preset in "${presets[@]}"; do
  echo "-- decode_ops --preset $preset" | tee -a "$OUT/decode_ops.log"
  env=""; case $preset in NO_PDL*) env="EXL2BUILD_NO_PDL=1"; preset=${preset#NO_PDL }; esac
  env $env timeout 180 $PY "$REPO/benchmarks/decode_ops.py" --device cuda --preset $preset >> "$OUT/decode_ops.log" 2>&1
  echo "decode_ops rc=$?"
done
grep -vE "^(STAGE|USDT)|profiler_st" "$OUT/decode_ops.log"

echo "== ncu $(date -u +%T)"
[ -n "${SKIP_NCU:-}" ] || timeout 120 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats --section SourceCounters --section InstructionStats -k regex:${NCU_KERNEL:-exl2_gemv} -c ${NCU_COUNT:-1} ${NCU_ARGS:-} \
  $PY "$REPO/benchmarks/kernels.py" --profile --profile-bpw ${PROFILE_BPW:-4.0} --profile-shape ${PROFILE_SHAPE:-4096x14336} > "$OUT/ncu.log" 2>&1
echo "ncu rc=$?"
if [ -n "${NCU_SOURCE:-}" ]; then  # per-SASS-instruction counts and stall samples, one CSV per shape of NCU_SOURCE
  for shape in $NCU_SOURCE; do
    timeout 120 ncu --section SourceCounters --section WarpStateStats -k regex:${NCU_KERNEL:-exl2_gemv} -c 1 -f -o "/tmp/src_$shape" \
      $PY "$REPO/benchmarks/kernels.py" --profile --profile-bpw ${PROFILE_BPW:-4.0} --profile-shape $shape > "$OUT/ncu_src_$shape.log" 2>&1
    ncu -i "/tmp/src_$shape.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_source_$shape.csv" 2>> "$OUT/ncu_src_$shape.log"
    echo "ncu source $shape rc=$? $(wc -l < "$OUT/ncu_source_$shape.csv") lines"
  done
fi
grep -E "exl2_matmul_kernel|exl2_gemv_kernel|Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|No Eligible|Warp Cycles Per Issued|stall|Stall" "$OUT/ncu.log" | head -40

if [ -n "${SASS_STATS:-}" ]; then  # opcode histogram of the profiled kernel's SASS
  so=$($PY -c "import exl2build._native as n; print(n.__file__)")
  cuobjdump -sass "$so" > "$OUT/sass.txt" 2>&1
  awk -v k="${NCU_KERNEL:-exl2_gemv}" '/Function :/{f=index($0,k)>0} f && /\/\*[0-9a-f]{4}\*\//{print $2}' "$OUT/sass.txt" \
    | sed 's/\..*//; s/;//' | sort | uniq -c | sort -rn | head -30
fi
echo "== compute-sanitizer $(date -u +%T)"
[ -n "${SKIP_SANITIZER:-}" ] && { echo "skipped (SKIP_SANITIZER set)"; exit 0; }
OUT=$OUT PY=$PY bash "$REPO/benchmarks/sanitize.sh"
echo "== done $(date -u +%T)"
