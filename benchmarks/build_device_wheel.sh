#!/bin/bash
# Build this tree's CUDA wheel (sm_90) for the device machine's Python 3.12 here, on the CPU machine
# (nvcc is here; the module links cudart statically and no libtorch, so the wheel runs with the
# device's torch). A device call then installs it in seconds instead of spending ~2 minutes of
# device time on the CUDA build: carry .prebuilt and set PREBUILT_WHEEL (device_kernels.sh), e.g.
#   PREBUILT_WHEEL=$(ls .prebuilt/exl2build-*-cp312-*.whl) SKIP_SANITIZER=1 bash benchmarks/device_kernels.sh --gemv
# device_ab_decode.sh installs TREE/.prebuilt's wheel for each tree that has one.
# Usage: bash benchmarks/build_device_wheel.sh [TREE]   (TREE: a checkout, e.g. .ab_base; default: this one)
# Needs a Python 3.12 interpreter: PY312 (default: the first python3.12 on PATH, else pyenv's).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "${1:-$REPO}"
if [ -z "${PY312:-}" ]; then  # the first candidate that runs (a pyenv shim may exist and fail)
  for c in $(command -v python3.12) "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && { PY312=$c; break; }
  done
fi
[ -n "${PY312:-}" ] || { echo "no Python 3.12 found: set PY312=/path/to/python3.12" >&2; exit 2; }
V=${V312:-/tmp/exl2build-py312}
[ -x "$V/bin/pip" ] || { "$PY312" -m venv "$V" && "$V/bin/pip" install -q scikit-build-core pybind11 cmake ninja; }
rm -rf .prebuilt && mkdir -p .prebuilt
EXL2BUILD_CUDA=ON EXL2BUILD_CUDA_ARCHS=90 PATH="$V/bin:$PATH" \
  "$V/bin/pip" wheel -q --no-deps --no-build-isolation . -w .prebuilt
# The wheel must hold the CUDA kernels, or the device would time the CPU path.
rm -rf "$V/check" && "$V/bin/pip" install -q --no-deps --target "$V/check" .prebuilt/*.whl
(cd /tmp && PYTHONPATH="$V/check" "$V/bin/python" -c "import exl2build._native as n; assert n.built_with_cuda, 'built without CUDA'")
bash "$REPO/benchmarks/tree_digest.sh" . > .prebuilt/DIGEST
echo "built $(ls .prebuilt/*.whl) (tree digest $(cat .prebuilt/DIGEST)) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- native exl2build CMakeLists.txt pyproject.toml || echo ' + uncommitted changes')"
