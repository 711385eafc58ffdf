#!/usr/bin/env bash
# exl2build vs exllamav2 0.3.2 side by side on one GPU, same card, same session: conversion time,
# cross-loading (we read what exllamav2 writes and vice versa), perplexity on the same token ids,
# eval/decode speed, kernels, and a Llama-2-7B-shaped model. Stages, each one 10-minute device
# call, run back to back (the machine stays warm ~30 s after a call; /tmp and the installed
# packages survive only while it does; a stage finds a released machine and says so, exit 3):
#
#   STAGE=prep     install the carried wheels whose import is missing, build exl2build with CUDA
#                  (sm_90), install exllamav2 0.3.2 and JIT-build its extension (timed)
#   STAGE=smol     SmolLM2-135M (benchmarks/sbs_smol.py): both converters, PPL of every build in
#                  both engines on the same token ids, eval and batch-1 decode speed
#                  [BPWS=4.0 (default) or e.g. BPWS=2.5,3.0; a second STAGE=smol call reuses what
#                  the first one finished (state under /tmp) and does the rest]
#   STAGE=kernels  exllamav2's EXL2 matmul and GPTQ kernels vs ours on the same tensors (sbs_kernels.py)
#   STAGE=big      Llama-2-7B shapes with LAYERS=4 random layers: per-layer measurement and quantization
#                  cost, peak VRAM/RSS of both converters; then batch-1 decode of a 32-layer 4.0 bpw
#                  model in both engines vs the bandwidth limit (sbs_big.py)
#                  [BIG_PARTS=convert,decode (default); if the call runs out of time the decode
#                  parts are skipped: run STAGE=big BIG_PARTS=decode right after]
# Results land in $OUT (at most 8 files a call come back): <stage>.json, <stage>.md, <stage>.log and
# <stage>_sub.log (all subprocess output, time-stamped). STAGE_BUDGET_S (default 570) is the time a
# stage plans with: parts that would not fit are skipped (and listed) instead of being killed.
#
# Fill the ignored folders here first (the device reaches no network):
#   bash benchmarks/fetch_device_wheels.sh        # -> .whl/ (about 6 MB; exllamav2 0.3.2, hydra, gguf, ...)
#   (pandas, ninja, pygments, regex, pillow are in the device image; add their py3.12 wheels to that
#    script if `prep` reports one missing)
#   split -b 48M SmolLM2-135M-Instruct.Q4_1.gguf .assets/smol.gguf.part-   # ../shared/tools/get-smollm2 DIR
#   cp ../shared/data/wikitext-2/valid.txt ../shared/data/wikitext-2-raw/wiki.test.raw .assets/
#   python benchmarks/sbs_llama2_tokenizer.py                               # -> .assets/llama2-tokenizer.json
#
# Device calls, back to back on one warm machine (sizes with the ~1 MB tree; times are estimates):
#   1. STAGE=prep    bash benchmarks/device_side_by_side.sh   carry .whl .assets/smol.gguf.part-aa    ~55 MiB  4-6 min
#   2. STAGE=smol    bash benchmarks/device_side_by_side.sh   carry .assets/smol.gguf.part-ab .assets/valid.txt
#                                                                   .assets/wiki.test.raw             ~49 MiB  8-9.5 min
#   3. STAGE=kernels bash benchmarks/device_side_by_side.sh   carry nothing                                    2-4 min
#   4. STAGE=big BIG_PARTS=convert bash benchmarks/device_side_by_side.sh
#                                                   carry .assets/llama2-tokenizer.json (+ .assets/valid.txt if
#                                                   call 2 did not run on this machine)        ~4.5 MiB  5-8 min
#   5. STAGE=big BIG_PARTS=decode  bash benchmarks/device_side_by_side.sh   carry nothing                  3-5 min
# Every carried file is also copied under /tmp/exl2sbs/assets, so later calls need not carry it again.
# A call that runs out of its budget lists the skipped parts; the same call again continues
# (smol and big keep finished parts in /tmp/exl2sbs/<stage>/state.json; FORCE: delete that file).
set -u -o pipefail
export PYTHONUNBUFFERED=1
export EXLLAMA_NO_SDPA=1                # anchors.md: mandatory without flash-attn (no causal mask otherwise)
export TORCH_CUDA_ARCH_LIST=9.0         # same value in every stage: it is part of the JIT build's command lines
export MAX_JOBS=${MAX_JOBS:-16}
W=/tmp/exl2sbs
export TORCH_EXTENSIONS_DIR=$W/torch_extensions
ASSETS=$W/assets
OUT=${OUT:-$W/out}
PY=${PY:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GGUF=$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$OUT" "$ASSETS/smollm2"
cd "$REPO"

# Carried assets stay under /tmp for the later calls of this warm machine.
for f in .assets/valid.txt .assets/wiki.test.raw .assets/llama2-tokenizer.json; do
  [ -f "$f" ] && cp -f "$f" "$ASSETS/"
done
if [ ! -s "$GGUF" ]; then
  for f in .assets/smol.gguf.part-*; do [ -f "$f" ] && cp -f "$f" "$ASSETS/"; done
fi

prepared() {
  # No `import exllamav2` here: with its extension missing that would start a silent JIT build.
  (cd /tmp && $PY -c "import importlib.util as u, exl2build._native as n
assert n.built_with_cuda and u.find_spec('exllamav2') and u.find_spec('fastparquet')") >/dev/null 2>&1 \
    && ls "$TORCH_EXTENSIONS_DIR"/exllamav2_ext/*.so >/dev/null 2>&1 && return 0
  echo "The machine is not prepared (a fresh one: the previous was released?). Run STAGE=prep first." >&2
  exit 3
}

do_prep() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "== wheels $(date -u +%T)"
  local want="" pair mod file f
  # module:wheel-file prefix; only the wheels whose import fails are installed
  for pair in pandas:pandas fastparquet:fastparquet cramjam:cramjam ninja:ninja pygments:pygments websockets:websockets \
              regex:regex PIL:pillow hydra:hydra_core omegaconf:omegaconf antlr4:antlr4 gguf:gguf; do
    mod=${pair%%:*}; file=${pair#*:}
    if ! (cd /tmp && $PY -c "import $mod") 2>/dev/null; then
      f=$(ls .whl/${file}[-_]* .whl/${file^}[-_]* 2>/dev/null | head -1)
      if [ -n "$f" ]; then want="$want $f"; else echo "MISSING: 'import $mod' fails and .whl/ has no ${file}-* or ${file}_*"; fi
    fi
  done
  echo "installing:${want:- nothing}"
  if [ -n "$want" ]; then $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir $want || return 1; fi
  echo "== exl2build (CUDA, sm_90) $(date -u +%T)"
  local t0=$(date +%s) rc
  # SKIP_OURS_BUILD=1: this call's tree was just built and installed (e.g. by device_kernels.sh).
  if [ -n "${SKIP_OURS_BUILD:-}" ] && (cd /tmp && $PY -c "import exl2build._native as n; assert n.built_with_cuda") 2>/dev/null; then
    echo "exl2build already installed with CUDA: not rebuilt"
  else
  EXL2BUILD_CUDA=ON EXL2BUILD_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 \
    $PY -m pip install -q --no-build-isolation --no-deps --no-cache-dir . > "$W/build.log" 2>&1
  rc=$?
  echo "exl2build build rc=$rc in $(( $(date +%s) - t0 )) s"
  if [ $rc -ne 0 ]; then tail -60 "$W/build.log"; return 1; fi
  fi
  (cd /tmp && $PY -c "import exl2build._native as n; print('exl2build CUDA kernels:', n.built_with_cuda)")
  echo "== exllamav2 0.3.2 $(date -u +%T)"
  $PY -m pip install -q --no-index --no-deps --no-cache-dir .whl/exllamav2-0.3.2-py3-none-any.whl || return 1
  (cd /tmp && $PY -c "
import time; t = time.time()
from exllamav2.ext import exllamav2_ext
print('exllamav2 extension JIT-built/loaded in %.0f s (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)' % (time.time() - t))
import exllamav2, fastparquet; print('exllamav2', exllamav2.__version__)") 2>&1 | grep -v '^\s*$' | tail -20
  prepared && echo "== prepared $(date -u +%T)"
}

case "${STAGE:-}" in
  prep)
    do_prep 2>&1 | tee "$OUT/prep.log"
    exit "${PIPESTATUS[0]}"
    ;;
  smol)
    prepared
    if [ ! -s "$GGUF" ]; then
      parts=$(ls "$ASSETS"/smol.gguf.part-* 2>/dev/null | sort)
      [ -n "$parts" ] || { echo "no GGUF parts under $ASSETS: carry .assets/smol.gguf.part-aa in the prep call and part-ab here" >&2; exit 4; }
      cat $parts > "$GGUF.tmp"
      if [ "$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)" != "$GGUF_SHA256" ]; then
        echo "joined GGUF ($(echo $parts)) does not match its sha256: a part is missing" >&2; rm -f "$GGUF.tmp"; exit 4
      fi
      mv "$GGUF.tmp" "$GGUF" && rm -f $parts
    fi
    $PY benchmarks/sbs_smol.py --assets "$ASSETS" --calib "$ASSETS/valid.txt" --eval "$ASSETS/wiki.test.raw" \
      --work "$W/smol" --out "$OUT" --bpws "${BPWS:-4.0}" 2>&1 | tee "$OUT/smol.log"
    ;;
  kernels)
    prepared
    $PY benchmarks/sbs_kernels.py --out "$OUT" ${KERNELS_ARGS:-} 2>&1 | tee "$OUT/kernels.log"
    ;;
  big)
    prepared
    $PY benchmarks/sbs_big.py --text "$ASSETS/valid.txt" --tokenizer "$ASSETS/llama2-tokenizer.json" --work "$W/big" \
      --out "$OUT" --layers "${LAYERS:-4}" --parts "${BIG_PARTS:-convert,decode}" 2>&1 | tee "$OUT/big.log"
    ;;
  *) echo "STAGE=prep|smol|kernels|big (see the header of $0)" >&2; exit 2 ;;
esac
