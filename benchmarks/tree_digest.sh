#!/bin/bash
# The digest of what a wheel of TREE is built from (native/, the build files, the exl2build package):
# build_device_wheel.sh records it beside the wheel (DIGEST), and the device scripts install a prebuilt
# wheel only where the carried tree still has the same digest (no stale kernels or Python timed by mistake).
# Usage: bash benchmarks/tree_digest.sh [TREE]                 prints the digest
#        bash benchmarks/tree_digest.sh TREE --matches FILE    exit 0 where FILE holds TREE's digest
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
digest=$(find native exl2build CMakeLists.txt pyproject.toml -type f ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' \
  -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if [ "${2:-}" = --matches ]; then
  [ "$(cat "${3:?--matches FILE}" 2>/dev/null)" = "$digest" ]
else
  echo "$digest"
fi
