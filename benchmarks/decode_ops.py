"""Operations per batch-1 decode step outside the matmuls, the launch count that bounds small-model
decode (issue 5): a captured CUDA graph still pays ~1-2 us per kernel node, and a SmolLM2 step
spent ~110 us per layer on an H200 (benchmarks/RESULTS.md).

Builds a random Llama folder (SmolLM2-135M shapes by default), loads it with our loader, and runs
decode steps in the static mode the CUDA-graph decoder captures (positions on the device; the
decode-attention kernel, or with --sdpa SDPA with a mask over the whole cache). Counts, per step:
  * on CUDA: GPU kernels (torch.profiler kernel events), split into matmul kernels and the rest;
  * on CPU: aten operators that compute (leaf operators other than views and metadata), the
    same program the CUDA graph holds, each of which is at least one kernel there.
Also prints the median step time (CPU timings are for comparison between versions only).

With --exl2 BPW (CUDA) the decoder's linears become random EXL2 tensors of that layout
(benchmarks/kernels.py random_qtensor: what the values are does not change the work), and the
run also prints where a step's GPU time goes (per kernel, from the profiler) and the step time
of a replayed CUDA graph (what `generate` does) against the bandwidth limit: bytes of the
decoder's and head's weights / the copy bandwidth measured in the same run.

Usage: python benchmarks/decode_ops.py [--device cpu|cuda] [--preset smollm2|llama2-7b] [--layers N]
       [--exl2 4.0] [--steps 5] [--cache-len 272 --start 16] [--sdpa] [--timeline]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sbs_common as sc  # noqa: E402
from random_llama import write_random_llama  # noqa: E402

from exl2build.model import forward  # noqa: E402
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
MATMUL_KERNELS = ("gemm", "gemv", "nvjet", "exl2_matmul", "dequant")  # cuBLAS and ours
PRESETS = {
    "smollm2": dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152),
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
}


def grow_layers(model, n: int) -> None:
    """Copies of the one loaded layer until the model has n (their linears are replaced next)."""
    first = model.layers[0]
    for i in range(1, n):
        layer = copy.deepcopy(first)
        layer.self_attn.layer_idx = i
        model.layers.append(layer)
    model.cfg.num_layers = n


def quantize_linears(model, bpw: float) -> None:
    """Every decoder linear becomes a random EXL2 linear of the same shape (the head stays FP16)."""
    from kernels import random_qtensor

    from exl2build.model.linear import EXL2Linear, FP16Linear

    for i, layer in enumerate(model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, m in list(parent.named_children()):
                if isinstance(m, FP16Linear):
                    setattr(parent, name, EXL2Linear(random_qtensor(m.K, m.N, bpw, 1000 * i + len(name), str(m.weight.device))))


def weight_bytes(model) -> int:
    """Bytes a decode step reads for the linears (the embedding reads one row)."""
    from exl2build.model.linear import EXL2Linear, FP16Linear

    total = 0
    for m in model.modules():
        if isinstance(m, EXL2Linear):
            total += sum(t.numel() * t.element_size() for t in (m.qtensor.q_weight, m.qtensor.q_scale))
        elif isinstance(m, FP16Linear):
            total += m.weight.numel() * 2
    return total


def kernel_times(prof) -> list[tuple[str, int, float]]:
    """(kernel name, launches, total device us) per kernel name, largest first."""
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg.setdefault(e.name, [0, 0.0])
            a[0] += 1
            a[1] += e.device_time
    return sorted(((k, n, t) for k, (n, t) in agg.items()), key=lambda r: -r[2])


def graph_step_seconds(model, cache, start: int, steps: int = 50) -> float:
    """Median seconds per decode step replaying the captured graph `generate` uses, from position `start`."""
    from exl2build.model.generate import GraphDecoder

    cache.length = start
    dec = GraphDecoder(model, cache)
    ids = torch.tensor([5], device=model.device)
    times = []
    for _ in range(5):
        cache.length = start
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step(ids)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def graph_timeline(model, cache, start: int, layers: int, steps: int = 3) -> None:
    """Where a replayed graph step's time goes, from the profiler's trace of `steps` replays: per
    kernel name and per slot of a layer, the mean GPU time, the mean gap from the previous kernel's
    end to its start (negative: it started before the previous one ended, as an early launch does;
    its time then includes waiting for that kernel), and the mean time it adds to the step (from the
    previous kernel's end to its own), which sums to the step's span."""
    from exl2build.model.generate import GraphDecoder

    cache.length = start
    dec = GraphDecoder(model, cache)
    ids = torch.tensor([5], device=model.device)
    for _ in range(3):
        dec.step(ids)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step(ids)
        torch.cuda.synchronize()
    ks = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[1])
    print("\n".join(timeline_tables(ks, steps, layers)))


def timeline_tables(ks: list[tuple[str, float, float]], steps: int, layers: int) -> list[str]:
    """graph_timeline's tables from (kernel name, start us, end us) of `steps` replays, by start."""
    if len(ks) < 2:
        return [f"timeline: the profiler saw {len(ks)} kernels in {steps} graph replays (no graph-node tracing here)"]
    rows: dict[str, list] = {}
    prev_end = None
    for name, t0, t1 in ks:
        r = rows.setdefault(name, [0, 0.0, 0.0, 0.0])
        r[0] += 1
        r[1] += t1 - t0
        if prev_end is not None:
            r[2] += t0 - prev_end
            r[3] += t1 - prev_end
        prev_end = t1 if prev_end is None else max(prev_end, t1)
    span = (ks[-1][2] - ks[0][1]) / steps
    out = [f"timeline of {steps} graph replays: {len(ks) // steps} kernels per step, span {span:.0f} us per step "
           "(with the host's gaps between replays, in the first kernel's 'adds')",
           f"  {'us/step':>8} {'calls':>5} {'us/call':>8} {'gap us':>7} {'adds us':>7}  kernel"]
    for name, (n, t, g, d) in sorted(rows.items(), key=lambda kv: -kv[1][3]):
        out.append(f"  {t / steps:8.1f} {n // steps:5d} {t / n:8.2f} {g / n:7.2f} {d / n:7.2f}  {name[:100]}")
    # One layer's kernels in order (the same linear kernel serves several shapes): the run of
    # kernels from one launch of a kernel that runs once per layer to the next; only runs with the
    # first run's kernels count (the last layer's run ends in the head).
    names = [k[0] for k in ks[:len(ks) // steps]]
    once = [n for n in dict.fromkeys(names) if names.count(n) == layers]
    if not once or layers < 2:
        return out
    at = [i for i, k in enumerate(ks) if k[0] == once[0]]
    period = at[1] - at[0]
    pattern = [k[0] for k in ks[at[0]:at[0] + period]]
    slots = [[0, 0.0, 0.0, 0.0] for _ in range(period)]
    for a in at:
        if a == 0 or a + period > len(ks) or [k[0] for k in ks[a:a + period]] != pattern:
            continue
        for j in range(period):
            (_, t0, t1), prev = ks[a + j], ks[a + j - 1]
            slots[j][0] += 1
            slots[j][1] += t1 - t0
            slots[j][2] += t0 - prev[2]
            slots[j][3] += t1 - prev[2]
    out.append(f"one layer ({period} kernels, from {once[0][:60]}; {slots[0][0]} runs):")
    for (n, t, g, d), name in zip(slots, pattern):
        out.append(f"  {t / n:8.2f} us  gap {g / n:6.2f} us  adds {d / n:6.2f} us  {name[:100]}")
    out.append(f"  {sum(s[1] / s[0] for s in slots):8.2f} us in kernels, {sum(s[2] / s[0] for s in slots):6.2f} us in "
               f"gaps, {sum(s[3] / s[0] for s in slots):6.2f} us per layer")
    return out


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
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--exl2", type=float, help="make the decoder's linears random EXL2 tensors of this bpw ")
    ap.add_argument("--cache-len", type=int, default=272, help="KV cache length (16-token prompt + 256 new)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--start", type=int, default=16, help="position of the first timed step (attention reads this many keys)")
    ap.add_argument("--sdpa", action="store_true", help="attention through SDPA with a mask, not decode_attention")
    ap.add_argument("--timeline", action="store_true", help="(CUDA) also trace graph replays: GPU time and gaps per kernel")
    args = ap.parse_args()
    if args.sdpa:
        forward.DECODE_ATTENTION = False
    dev = torch.device(args.device)
    dims = dict(PRESETS[args.preset])
    if args.layers:
        dims["layers"] = args.layers
    layers = dims["layers"]
    if args.exl2:  # one FP16 layer on disk, copied: a 7B-shaped FP16 folder would take minutes to write
        dims["layers"] = 1
    with tempfile.TemporaryDirectory() as tmp:
        write_random_llama(Path(tmp), **dims, tie=True)
        model, cfg = load_model(tmp, device=dev)
    if args.exl2:
        grow_layers(model, layers)
        quantize_linears(model, args.exl2)
    cache = model.new_cache(1, args.cache_len)
    model(torch.tensor([[1, 2, 3, 4]]), cache)  # a prompt, then static decode steps
    if not 4 <= args.start <= args.cache_len - 60:
        ap.error(f"--start {args.start}: must lie in 4..{args.cache_len - 60} (the cache holds {args.cache_len})")
    model.rotary.ensure(args.cache_len)  # as GraphDecoder does: static steps gather rows on the device
    cache.pos_t = torch.full((1,), args.start, dtype=torch.long, device=dev)
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
        mm = sum(n for k, n in names.items() if any(w in k.lower() for w in MATMUL_KERNELS))
        print(f"{dev}: {total} kernels per step ({total / cfg.num_layers:.1f} per layer), matmul kernels {mm}, "
              f"others {total - mm} ({(total - mm) / cfg.num_layers:.1f} per layer)")
        rows = kernel_times(prof)
        busy = sum(r[2] for r in rows)
        print(f"GPU busy {busy:.0f} us per step (profiled, eager); per kernel:")
        for name, n, t in rows[:15]:
            print(f"  {t:9.1f} us {100 * t / busy:5.1f} % {n:4d}x  {name[:110]}")
    else:
        ops = leaf_ops(prof)
        total = sum(ops.values())
        mm = sum(n for k, n in ops.items() if k.startswith(MATMUL))
        print(f"{dev}: {total} computing operators per step ({total / cfg.num_layers:.1f} per layer), matmuls {mm}, "
              f"others {total - mm} ({(total - mm) / cfg.num_layers:.1f} per layer)")
        for k, n in ops.most_common(20):
            print(f"  {n:5d} {k}")
    t_step, _ = sc.timed(torch, dev, lambda: None, step, args.steps)
    print(f"median step {1e3 * t_step:.2f} ms (eager, {cfg.num_layers} layers)")
    if dev.type == "cuda":
        from kernels import copy_bandwidth

        bw = copy_bandwidth()
        limit = weight_bytes(model) / bw
        t = graph_step_seconds(model, cache, args.start)
        print(f"CUDA graph step {1e3 * t:.3f} ms = {1 / t:.1f} tok/s; weights {weight_bytes(model) / 1e9:.3f} GB, "
              f"copy bandwidth {bw / 1e9:.0f} GB/s -> limit {1e3 * limit:.3f} ms = {1 / limit:.0f} tok/s "
              f"({100 * limit / t:.1f} % of the limit)")
        if args.timeline:
            graph_timeline(model, cache, args.start, cfg.num_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
