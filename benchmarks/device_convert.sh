#!/usr/bin/env bash
# SmolLM2-135M end to end on the GPU machine, through the real CLI and recipe:
# import the GGUF, measure, build 2.5/3.0/4.0 bpw, evaluate on wikitext-2-raw test
# (147 x 2048 windows, exllamav2's method) against FP16 — the setup of anchors.md.
#
# The GGUF (98 MB) does not fit one device call, so this runs in two calls back to back
# (the machine stays warm ~30 s between them):
#   here:  split -b 48M SmolLM2-135M-Instruct.Q4_1.gguf .assets/smol.gguf.part-
#          cp ../shared/data/wikitext-2/valid.txt ../shared/data/wikitext-2-raw/wiki.test.raw .assets/
#          pip download (py3.12) hydra-core omegaconf gguf antlr4-python3-runtime into .whl/
#   call 1 (carry .whl and .assets/smol.gguf.part-aa):  STAGE=prep bash benchmarks/device_convert.sh
#   call 2 (carry .assets/smol.gguf.part-ab, valid.txt, wiki.test.raw): STAGE=run bash benchmarks/device_convert.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/exl2build-out}
ASSETS=/tmp/exl2build-assets
mkdir -p "$OUT" "$ASSETS/smollm2"
case "${STAGE:-}" in
  prep)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation .whl/*
    EXL2BUILD_CUDA=ON EXL2BUILD_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
    cp .assets/smol.gguf.part-aa "$ASSETS/"
    python3 -c "import exl2build._native as n; print('CUDA kernels:', n.built_with_cuda)"
    ;;
  run)
    cat "$ASSETS/smol.gguf.part-aa" .assets/smol.gguf.part-ab > "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    export EXL2BUILD_ASSETS=$ASSETS
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
    /usr/bin/time -v exl2build build recipe=smollm2-135m device=cuda \
      calib.path="$PWD/.assets/valid.txt" eval.text.path="$PWD/.assets/wiki.test.raw" \
      "eval.text.rows=${EVAL_ROWS:-147}" "quant.bpws=${BPWS:-[2.5,3.0,4.0]}" \
      out_dir=/tmp/exl2build-builds cache_dir=/tmp/exl2build-cache 2>&1 | tee "$OUT/build.log"
    cp /tmp/exl2build-builds/report.md /tmp/exl2build-builds/report.json "$OUT/"
    ;;
  *) echo "STAGE=prep or STAGE=run" >&2; exit 2 ;;
esac
