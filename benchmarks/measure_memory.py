"""Peak host memory of measurement on one layer with 7B shapes (CPU, random weights, no download).

    python benchmarks/measure_memory.py [--hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32]
                                        [--rows 2 --length 256 --steps 5] [--rev COMMIT]

Writes a 1-layer Llama-shaped model into a temp dir and runs quant.measure.measure_model on it
on the CPU with the full option tables. A thread samples the resident set every 2 ms and
attributes it to the phase running (reference pass + Hessians, prepare, GPTQ of one linear,
scoring options); the process peak (ru_maxrss) is printed too. Peaks are reported above the
RSS once the model is written and the calibration states exist, so they count what
measurement itself allocates.

--rev COMMIT runs the quantizer modules (hessian, gptq, layerwise, measure) of that commit
instead of the checkout's, for a before/after comparison in the same environment.

On CPU activations are fp32 and FP16Linear keeps an fp32 copy of its weight (6 bytes per
weight per quantized copy); on a GPU activations and copies are fp16 (2 bytes), so the
numbers here are an upper bound of the same allocations on a card.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import exl2build  # noqa: F401  (sets the OpenMP wait policy before torch starts)
from random_llama import write_random_llama  # benchmarks/ (this script's folder)

REPO = Path(__file__).resolve().parents[1]
MODULES = ("hessian", "gptq", "layerwise", "measure")  # import order: each may import the ones before


def load_rev(rev: str) -> None:
    """Install the quantizer modules of git revision `rev` under their usual names."""
    for name in MODULES:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:exl2build/quant/{name}.py"],
                             check=True, capture_output=True, text=True).stdout
        full = f"exl2build.quant.{name}"
        mod = types.ModuleType(full)
        mod.__file__ = f"{rev}:exl2build/quant/{name}.py"
        sys.modules[full] = mod
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler:
    def __init__(self):
        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop:
            r = rss()
            if r > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = r
            time.sleep(0.002)


def write_model(root: Path, a) -> Path:
    """One 7B-shaped (by default) decoder layer; a 256-token vocabulary keeps the embedding small."""
    return write_random_llama(root, layers=1, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                              kv_heads=a.kv_heads, vocab=256)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="scale-search steps (time only; memory does not depend on it)")
    ap.add_argument("--rev", default=None, help="run the quantizer modules of this git revision")
    a = ap.parse_args()
    if a.rev:
        load_rev(a.rev)
    import torch

    from exl2build.quant import layerwise, measure

    s = Sampler()

    def phased(mod, name, label):
        fn = getattr(mod, name)

        def wrapper(*args, **kw):
            old, s.phase = s.phase, label
            try:
                return fn(*args, **kw)
            finally:
                s.phase = old

        setattr(mod, name, wrapper)

    phased(measure, "block_hessians", "reference pass + Hessians")
    phased(measure, "prepare", "prepare (act-order, inverse Cholesky)")
    phased(measure, "quantize_linear", "GPTQ of one linear")
    if hasattr(measure, "score_options"):  # scores a uNN/sNN pair at a time
        phased(measure, "score_options", "scoring options")
    else:
        phased(layerwise, "rel_error", "scoring options")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model").mkdir()
        root = write_model(Path(d) / "model", a)
        tokens = torch.randint(0, 256, (a.rows, a.length), generator=torch.Generator().manual_seed(1))
        base = rss()
        s.thread.start()
        s.phase = "measurement (other)"
        t0 = time.time()
        measure.measure_model(root, tokens, {"scale_search": {"p_steps": a.steps}}, Path(d) / "work", None, device="cpu")
        dt = time.time() - t0
        s.stop = True
        s.thread.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"code: {a.rev or 'checkout'}; layer hidden {a.hidden}, intermediate {a.intermediate}, heads {a.heads}/{a.kv_heads}; "
          f"{a.rows} x {a.length} tokens; {dt:.0f} s")
    print(f"RSS before measurement: {base / 2**30:.2f} GiB; process peak (ru_maxrss): {peak / 2**30:.2f} GiB "
          f"(+{(peak - base) / 2**30:.2f} GiB)")
    for phase, p in sorted(s.peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:<40} peak +{(p - base) / 2**30:6.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
