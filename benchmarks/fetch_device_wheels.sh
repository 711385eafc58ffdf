#!/bin/bash
# Fill .whl/ (ignored) with the Python 3.12 wheels the device machine lacks: it reaches no network,
# and its image has torch, transformers, pyarrow, sentencepiece, tokenizers, rich, matplotlib and
# jinja2 but not these. Run it here, in a fresh checkout, before the first device call that
# carries .whl (device_kernels.sh, device_gemv_plan.sh, device_ab_decode.sh, device_side_by_side.sh).
#   bash benchmarks/fetch_device_wheels.sh        -> .whl/ (about 6 MB), one version of each package
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
P=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${P[@]}" -d .whl \
  hydra-core==1.3.2 omegaconf==2.3.0 gguf==0.19.0 fastparquet cramjam websockets
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) is an sdist only: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
# exllamav2 0.3.2: a py3-none-any wheel whose CUDA extension compiles on first import there.
python3 -m pip download -q --no-deps -d .whl exllamav2==0.3.2
ls .whl | grep -v '\.whl$' && { echo "not a wheel in .whl (above): the device installs wheels only" >&2; exit 1; }
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/: $(ls .whl | tr '\n' ' ')"
