#!/bin/bash
# Wall time of a clean build of the native module, one row per configuration, on this machine
# (issue 3: CPU-only and CPU+CUDA build times on 2 cores, small enough that CI stays under 20 min).
#   bash benchmarks/build_time.sh [CONFIG ...]   CONFIG: cpu | cuda90 | cuda80,90 (default: all three)
# Each row configures and builds from an empty folder with the flags scikit-build-core passes
# (Release, Ninja, the project's CMakeLists.txt), with as many jobs as there are cores.
# Needs the project's venv (.venv), cmake, ninja, pybind11 and, for the CUDA rows, nvcc.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
# pybind11 is a build requirement only: take it from the venv, else from the system's Python.
PYBIND11_DIR=$("$PY" -m pybind11 --cmakedir 2>/dev/null || python3 -m pybind11 --cmakedir)
JOBS=$(nproc)
[ $# -gt 0 ] || set -- cpu cuda90 cuda80,90
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
printf '| build | CUDA archs | jobs | configure s | compile + link s | total s |\n|---|---|---|---|---|---|\n'
for cfg in "$@"; do
  case "$cfg" in
    cpu) flags=(-DEXL2BUILD_CUDA=OFF); archs=- ;;
    cuda*) archs=${cfg#cuda}; flags=(-DEXL2BUILD_CUDA=ON "-DEXL2BUILD_CUDA_ARCHS=${archs//,/;}") ;;
    *) echo "unknown configuration '$cfg': use cpu, cuda90 or cuda80,90" >&2; exit 2 ;;
  esac
  dir=$(mktemp -d /tmp/exl2build-buildtime.XXXXXX)
  t0=$(date +%s.%N)
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$PYBIND11_DIR" \
    -DPython_EXECUTABLE="$PY" "${flags[@]}" \
    > "$dir.configure.log" 2>&1 || { cat "$dir.configure.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  cmake --build "$dir" -j "$JOBS" > "$dir.build.log" 2>&1 || { tail -30 "$dir.build.log" >&2; exit 1; }
  t2=$(date +%s.%N)
  printf '| %s | %s | %s | %.1f | %.1f | %.1f |\n' "$cfg" "$archs" "$JOBS" \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$(echo "$t2 - $t0" | bc)"
  rm -rf "$dir" "$dir.configure.log" "$dir.build.log"
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average when it started: $LOAD0"
