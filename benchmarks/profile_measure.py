"""Where measurement spends its time: a SmolLM2-135M-shaped model with random weights.

    python benchmarks/profile_measure.py [--layers 4] [--rows 16] [--length 2048] [--device cuda] [--scale-steps 25]

Builds the model folder in a temp dir (no download), runs quant.measure.measure_model on the
first layers under cProfile and prints the hottest functions and the time per layer.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import exl2build  # noqa: F401  (sets the OpenMP wait policy before torch starts)
import torch
from random_llama import write_random_llama  # benchmarks/ (this script's folder)

from exl2build.quant.measure import measure_model

SMOLLM2 = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


def write_model(root: Path, layers: int) -> Path:
    return write_random_llama(root, layers=layers, **SMOLLM2, rope_theta=100000.0, max_positions=8192, tie=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--scale-steps", type=int, default=None, help="quant.scale_steps: factors in the scale search (default 121; the demo: 25)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model").mkdir()
        root = write_model(Path(d) / "model", a.layers)
        tokens = torch.randint(0, SMOLLM2["vocab"], (a.rows, a.length), generator=torch.Generator().manual_seed(1))
        prof = cProfile.Profile()
        t0 = time.time()
        prof.enable()
        measure_model(root, tokens, {"scale_search": {"p_steps": a.scale_steps}} if a.scale_steps else {}, Path(d) / "work", None,
                      device=a.device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        prof.disable()
        dt = time.time() - t0
    print(f"device {a.device}: {a.layers} layers, {a.rows} x {a.length} tokens: {dt:.1f} s, {dt / a.layers:.2f} s/layer")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
