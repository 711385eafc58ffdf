"""Operations per batch-1 decode step outside the matmuls, the launch count that bounds small-model
decode (issue 5): a captured CUDA graph still pays ~1-2 us per kernel node, and a SmolLM2 step
spent ~110 us per layer on an H200 (benchmarks/RESULTS.md).

Builds a random Llama folder (SmolLM2-135M shapes by default), loads it with our loader, and runs
decode steps in the static mode the CUDA-graph decoder captures (positions on the device, the
mask over the whole cache). Counts, per step:
  * on CUDA: GPU kernels (torch.profiler kernel events), split into matmul kernels and the rest;
  * on CPU: aten operators that compute (leaf operators other than views and metadata), the
    same program the CUDA graph holds, each of which is at least one kernel there.
Also prints the median step time (CPU timings are for comparison between versions only).

Usage: python benchmarks/decode_ops.py [--device cpu|cuda] [--layers 30] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_llama import write_random_llama  # noqa: E402

from exl2build.model.load import load_model  # noqa: E402

# Operators that only make views or read metadata: no kernel.
NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::transpose", "aten::t", "aten::permute",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::alias", "aten::detach", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh",
    "aten::result_type", "aten::_reshape_alias", "aten::split", "aten::chunk", "aten::narrow", "aten::resolve_conj",
    "aten::resolve_neg", "aten::view_as", "aten::expand_as", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::unflatten", "aten::flatten", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
}
MATMUL = ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::linear", "exl2")


def leaf_ops(prof) -> Counter:
    """Computing aten operators that have no aten operator below them."""
    out = Counter()
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in NO_KERNEL:
            continue
        if any(c.name.startswith("aten::") and c.name not in NO_KERNEL for c in e.cpu_children):
            continue
        out[e.name] += 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_llama(Path(tmp), layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                           heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, tie=True)
        model, cfg = load_model(tmp, device=dev)
    cache = model.new_cache(1, 64)
    model(torch.tensor([[1, 2, 3, 4]]), cache)  # a prompt, then static decode steps
    cache.pos_t = torch.full((1,), cache.length, dtype=torch.long, device=dev)
    ids = torch.tensor([[5]], device=dev)

    def step():
        model.hidden(ids, cache)  # the decoder stack; the head is one matmul either way
        cache.pos_t += 1

    for _ in range(2):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    if dev.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names = Counter(e.name for e in kernels)
        total = sum(names.values())
        mm = sum(n for k, n in names.items() if "gemm" in k.lower() or "gemv" in k.lower() or "exl2" in k.lower())
        print(f"{dev}: {total} kernels per step ({total / cfg.num_layers:.1f} per layer), matmul kernels {mm}, "
              f"others {total - mm} ({(total - mm) / cfg.num_layers:.1f} per layer)")
    else:
        ops = leaf_ops(prof)
        total = sum(ops.values())
        mm = sum(n for k, n in ops.items() if k.startswith(MATMUL))
        print(f"{dev}: {total} computing operators per step ({total / cfg.num_layers:.1f} per layer), matmuls {mm}, "
              f"others {total - mm} ({(total - mm) / cfg.num_layers:.1f} per layer)")
        for k, n in ops.most_common(20):
            print(f"  {n:5d} {k}")
    times = []
    for _ in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(f"median step {1e3 * statistics.median(times):.2f} ms (eager, {cfg.num_layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
