#!/usr/bin/env bash
# SmolLM2-135M-Instruct converted on the CPU at one bitrate with 16 x 512 calibration tokens
# (issue 4's CPU target: under 10 minutes on 2 cores), through the real CLI and recipe.
#
#   bash benchmarks/cpu_convert.sh            # conversion, timed; then a small evaluation
#   BPW=3.0 WORK=/tmp/x bash benchmarks/cpu_convert.sh
#
# Step 1 (timed with /usr/bin/time -v, a fresh cache so every step runs): import the GGUF,
# calibration tokens from wikitext-2 valid.txt (16 x 512 for quantization and for
# measurement), measurement, optimize, quantize, compile; evaluation off.
# Step 2 (not part of the target): the same recipe with evaluation on the first 8 windows of 512 tokens of
# wiki.test.raw, reusing the cache, so only the evaluation steps run.
# Needs ../shared (data) and the GGUF (fetched on first use; ../shared/tools/get-smollm2 puts
# it in the same asset cache). Load of the machine is printed before and after: the 2 cores
# may be shared.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-$(cd .. && pwd)/shared}
WORK=${WORK:-/tmp/exl2build-cpu-convert}
BPW=${BPW:-4.0}
EXL2BUILD=${EXL2BUILD:-exl2build}
valid="$SHARED/data/wikitext-2/valid.txt"
test_raw="$SHARED/data/wikitext-2-raw/wiki.test.raw"
for f in "$valid" "$test_raw"; do
  [ -f "$f" ] || { echo "cpu_convert: $f is missing (the shared data lives in ../shared)" >&2; exit 2; }
done
rm -rf "$WORK"
mkdir -p "$WORK"
common=(recipe=smollm2-135m device=cpu "quant.bpws=[$BPW]" "calib.path=$valid"
        calib.rows=16 calib.length=512 calib.measure_rows=16 calib.measure_length=512
        "out_dir=$WORK/builds" "cache_dir=$WORK/cache")
echo "load before: $(uptime)"
nproc
/usr/bin/time -v "$EXL2BUILD" build "${common[@]}" eval=off 2>&1 | tee "$WORK/convert.log"
echo "load after:  $(uptime)"
"$EXL2BUILD" build "${common[@]}" "eval.text.path=$test_raw" eval.ctx=512 eval.windows=8 \
  2>&1 | tee "$WORK/eval.log"
grep -E "^\| (FP16|[0-9])" "$WORK/builds/report.md" || cat "$WORK/builds/report.md"
