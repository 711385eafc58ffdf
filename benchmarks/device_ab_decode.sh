#!/bin/bash
# A/B of the batch-1 decode step between trees on one GPU, in one device call (a fresh machine per
# call differs by 5-10 % from the last one, so A/B across calls cannot resolve small changes).
# Builds each tree of TREES (name:dir pairs; dirs are checkouts of other commits, e.g.
# `git worktree add .ab_base REV`, carried to the device; "." is this tree) side by side (CUDA,
# sm_90), then runs decode_ops.py for each preset with the builds alternating, ROUNDS times.
# Logs in $OUT/ab_decode.log. KERNELS=1 also times exl2_matmul at M = 1, 8, 16, 32 on the four Llama shapes
# (`kernels.py --gemv --no-sweep`) for each build, alternating, and joins them in $OUT/ab_kernels.md.
# A tree holding .prebuilt/exl2build-*-cp312-*.whl (benchmarks/build_device_wheel.sh TREE; carry it) installs
# that wheel instead of building.
# Usage: TREES='base:.ab_base head:.' [ENVS='K=0;K=1'] [CHECK_K='gemv or group'] [TIMELINE=1] [SANITIZE=head] [PROBE=shapes] [PRESETS='llama2-7b --exl2 4.0;smollm2 --exl2 4.0'] [ROUNDS=2] \
#        bash benchmarks/device_ab_decode.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
read -ra trees <<< "${TREES:?TREES: name:dir pairs}"
OUT=${OUT:-/tmp/exl2build-out}
PY=${PY:-python3}
mkdir -p "$OUT"
for pair in hydra:hydra_core omegaconf:omegaconf antlr4:antlr4 gguf:gguf; do
  (cd /tmp && $PY -c "import ${pair%%:*}") 2>/dev/null && continue
  f=$(ls "$REPO"/.whl/${pair#*:}[-_]* 2>/dev/null | head -1); [ -n "$f" ] && $PY -m pip install -q --no-index --no-deps --no-build-isolation "$f" >/dev/null 2>&1
done
build() {  # tree, target dir (emptied first: on a warm machine pip --target keeps the old package)
  rm -rf "$2"
  # A wheel that benchmarks/build_device_wheel.sh built on the CPU machine is installed instead (seconds,
  # not minutes of device time); the phase-probe build always compiles here.
  local whl=""
  [ -z "${EXL2BUILD_PHASE_PROBE:-}" ] && whl=$(ls "$1"/.prebuilt/exl2build-*-cp312-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ] && ! bash "$REPO/benchmarks/tree_digest.sh" "$1" --matches "$1/.prebuilt/DIGEST"; then
    echo "$whl is stale (the tree changed after benchmarks/build_device_wheel.sh): building instead" >&2; whl=""
  fi
  if [ -n "$whl" ]; then
    $PY -m pip install --no-deps --no-cache-dir --target "$2" "$whl" > "$2.log" 2>&1
    return
  fi
  EXL2BUILD_CUDA=ON EXL2BUILD_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=6 timeout 400 \
    $PY -m pip install --no-build-isolation --no-deps --no-cache-dir --target "$2" "$1" > "$2.log" 2>&1
}
t0=$(date +%s)
# PROBE='4096x14336,8192x28672': also build the last tree with the phase probe (from a copy of the
# tree: scikit-build-core keeps its build folder inside the source) and, after the decode timings,
# run gemv_phases.py on these shapes under each ENVS setting; logs in $OUT/phases_<k>.log.
if [ -n "${PROBE:-}" ]; then
  last=${trees[-1]}; rm -rf /tmp/probe_src; cp -r "$(cd "$REPO/${last#*:}" && pwd)" /tmp/probe_src; rm -rf /tmp/probe_src/build
  EXL2BUILD_PHASE_PROBE=ON build /tmp/probe_src /tmp/ab_probe &
fi
for tr in "${trees[@]}"; do build "$(cd "$REPO/${tr#*:}" && pwd)" "/tmp/ab_${tr%%:*}" & done
wait
echo "builds done in $(( $(date +%s) - t0 )) s"
for tr in "${trees[@]}"; do echo "${tr%%:*}: $(tail -1 "/tmp/ab_${tr%%:*}.log")"; done
# CHECK_K: first run the CUDA tests of each build but the first (the reference) selected by this -k expression (e.g. "gemv or group"), from its tree.
if [ -n "${CHECK_K:-}" ]; then
  checked=("${trees[@]:1}"); [ ${#trees[@]} -eq 1 ] && checked=("${trees[@]}")  # the first tree is the reference, unless alone
  for tr in "${checked[@]}"; do
    side=${tr%%:*}; tree=$(cd "$REPO/${tr#*:}" && pwd)
    (cd /tmp && PYTHONPATH=/tmp/ab_$side timeout 120 $PY -m pytest "$tree/tests" -m cuda -q -n 16 -p no:cacheprovider \
      --rootdir "$tree" -k "$CHECK_K") > "$OUT/ab_check_$side.log" 2>&1
    echo "$side: CUDA tests rc=$? $(tail -1 "$OUT/ab_check_$side.log")"
  done
fi
IFS=';' read -ra presets <<< "${PRESETS:-llama2-7b --exl2 4.0;smollm2 --exl2 4.0}"
# ENVS='A=1;A=2': each build runs once per environment setting (labels side0, side1, ...), e.g. to
# compare a launcher's EXL2BUILD_* knob within one build.
IFS=';' read -ra envs <<< "${ENVS:-}"; [ ${#envs[@]} -eq 0 ] && envs=("")
runs=()  # label|build|tree|env
for tr in "${trees[@]}"; do
  for k in "${!envs[@]}"; do
    label=${tr%%:*}; [ ${#envs[@]} -gt 1 ] && label=$label$k
    runs+=("$label|${tr%%:*}|$(cd "$REPO/${tr#*:}" && pwd)|${envs[$k]}")
    [ -n "${envs[$k]}" ] && echo "$label = ${tr%%:*} with ${envs[$k]}"
  done
done
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" | tee "$OUT/ab_decode.log"
for r in $(seq "${ROUNDS:-2}"); do
  for preset in "${presets[@]}"; do
    for run in "${runs[@]}"; do
      IFS='|' read -r label side tree e <<< "$run"
      line=$(cd /tmp && env $e PYTHONPATH=/tmp/ab_$side timeout 180 $PY "$tree/benchmarks/decode_ops.py" --device cuda --preset $preset 2>&1 | grep "CUDA graph step")
      echo "round $r | $label | $preset | $line" | tee -a "$OUT/ab_decode.log"
    done
  done
done
if [ -n "${PROBE:-}" ]; then
  echo "probe build: $(tail -1 /tmp/ab_probe.log)"
  for k in "${!envs[@]}"; do
    (cd /tmp && env ${envs[$k]} PYTHONPATH=/tmp/ab_probe timeout 300 $PY /tmp/probe_src/benchmarks/gemv_phases.py \
      --shapes "$PROBE" --bpw "${PROBE_BPW:-4.0,2.5}" --runs 5) > "$OUT/phases_$k.log" 2>&1
    echo "phases | ${envs[$k]:-default} | rc=$? | $OUT/phases_$k.log"
  done
fi
# TIMELINE=1: per preset and tree, one more run that traces graph replays (decode_ops.py --timeline):
# GPU time and gaps per kernel and per slot of a layer; in $OUT/timeline_<side>_<preset>.log.
if [ -n "${TIMELINE:-}" ]; then
  for preset in "${presets[@]}"; do
    for run in "${runs[@]}"; do
      IFS='|' read -r label side tree e <<< "$run"; tag=$(echo "$preset" | tr -c 'a-z0-9.\n' '_' | cut -c1-24)
      (cd /tmp && env $e PYTHONPATH=/tmp/ab_$side timeout 240 $PY "$tree/benchmarks/decode_ops.py" --device cuda --preset $preset \
        --timeline) > "$OUT/timeline_${label}_$tag.log" 2>&1
      echo "timeline | $label | $preset | rc=$? | $(grep 'timeline of' "$OUT/timeline_${label}_$tag.log")"
    done
  done
fi
# SANITIZE=name: compute-sanitizer memcheck and racecheck over one pass through every kernel of that
# tree's build (kernels.py --sanitize), after the decode timings; logs in $OUT/sanitize_<tool>.log.
if [ -n "${SANITIZE:-}" ]; then
  for tr in "${trees[@]}"; do
    [ "${tr%%:*}" = "$SANITIZE" ] || continue
    tree=$(cd "$REPO/${tr#*:}" && pwd)
    echo "$SANITIZE:"; PYTHONPATH=/tmp/ab_$SANITIZE OUT=$OUT PY=$PY TREE=$tree bash "$REPO/benchmarks/sanitize.sh"
  done
fi
[ -n "${KERNELS:-}" ] || exit 0
for r in $(seq "${ROUNDS:-2}"); do
  for run in "${runs[@]}"; do
    IFS='|' read -r label side tree e <<< "$run"
    (cd /tmp && env $e PYTHONPATH=/tmp/ab_$side timeout 240 $PY "$tree/benchmarks/kernels.py" --gemv --no-sweep) \
      > "$OUT/ab_kernels_${label}_$r.log" 2>&1
    echo "round $r | $label | kernels.py rc=$?"
  done
done
# One row per shape, bpw and M: each run's median over the rounds.
$PY - "$OUT" "${runs[@]}" <<'PYEOF'
import glob, re, statistics, sys
out, sides = sys.argv[1], [t.split("|")[0] for t in sys.argv[2:]]
times = {}
for side in sides:
    for path in glob.glob(f"{out}/ab_kernels_{side}_*.log"):
        for line in open(path):
            m = re.match(r"\s*(\d+x\d+)\s+([\d.]+) bpw M=(\d+)\s+([\d.]+) us", line)
            if m:
                times.setdefault((m[1], m[2], int(m[3])), {}).setdefault(side, []).append(float(m[4]))
rows = ["| K x N | bpw | M | " + " | ".join(f"{s} us" for s in sides) + f" | {sides[-1]} / {sides[0]} |",
        "|---" * (4 + len(sides)) + "|"]
for key in sorted(times, key=lambda k: (int(k[0].split("x")[0]) * int(k[0].split("x")[1]), k[1], k[2])):
    med = [statistics.median(times[key][s]) if s in times[key] else float("nan") for s in sides]
    rows.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{t:.1f}" for t in med) + f" | {med[-1] / med[0]:.3f} |")
open(f"{out}/ab_kernels.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PYEOF
