#!/bin/bash
# compute-sanitizer memcheck and racecheck over one pass through every kernel (kernels.py --sanitize)
# of whatever exl2build the current python imports (set PYTHONPATH for a build elsewhere), with
# kernels.py of TREE (default: this checkout).
# Logs in $OUT/sanitize_<tool>.log; prints each tool's exit status and summary.
# Usage: OUT=dir [PY=python3] [TREE=checkout] bash benchmarks/sanitize.sh
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/exl2build-out}
PY=${PY:-python3}
TREE=${TREE:-$REPO}
mkdir -p "$OUT"
for tool in memcheck racecheck; do
  (cd /tmp && timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 $PY "$TREE/benchmarks/kernels.py" --sanitize) \
    > "$OUT/sanitize_$tool.log" 2>&1
  echo "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize pass|Error|error" "$OUT/sanitize_$tool.log" | head -8
done
