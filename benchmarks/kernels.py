"""Kernel benchmarks on one CUDA GPU: the card's ceilings, then the EXL2 kernels.

Measures, in one run:
  * ceilings: device-to-device copy bandwidth (bytes read + written) and fp16 matmul
    TFLOP/s through torch (cuBLAS);
  * exl2_matmul at 2.5 / 4.0 / 6.0 bpw on (K, N) = 4096x4096, 4096x14336, 14336x4096,
    8192x28672 for M = 1, 8 (the decode-sized kernel, beside the tensor-core and SIMT kernels),
    M = 32 (tensor-core fused kernel, and the SIMT one it replaced) and
    M = 2048 (dequant + torch.matmul, new and previous dequant), beside the plain fp16
    torch.matmul of the same shape; achieved bandwidth = bytes of the packed weights
    (q_weight + q_scale) / time, and its ratio to the copy bandwidth;
  * a sweep of the tensor-core kernel's K splits at M = 1 and 8; with --gemv only the ceilings,
    M = 1, 8, 16, 32 (--gemv-m) on the Llama shapes (--shapes), and the decode-sized kernel's
    warps x K-split x warps-along-K sweep (--sweep-m, --sweep-bpw);
  * gptq_group (groups of 128 rows) and group_scale_search over whole linears of K rows;
  * logit_stats over [2048, 128256] f16 logits.

Timing: CUDA events around CUDA-graph replays of many launches (so host launch overhead is
out), median over repeats; the weights rotate among enough copies to exceed the L2 cache.

Usage: python benchmarks/kernels.py [--quick] [--gemv] [--out RESULTS_FRAGMENT.md] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys

import torch

from exl2build import _native, kernels
from exl2build.format.exl2 import QTensor

C = getattr(_native, "cuda", None)  # absent from a CPU-only build (random_qtensor still works)
L2_BYTES = 60 << 20
MATMUL_SIMT = 8  # exl2_matmul_cfg flags: the SIMT fused kernel
MATMUL_TC = 16  # the tensor-core fused kernel (the default for f16 at M >= 2)


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def time_graph(fn, inner: int, repeats: int = 15) -> float:
    """Median seconds of one fn() call, from CUDA-graph replays of `inner` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times)


# M = 2048 products are timed over this many back-to-back calls (time_events' inner).
LARGE_M_INNER = 5


QUEUE_CYCLES_PER_CALL = 400_000  # ~0.2 ms at 2 GHz: more than a call's host time (checks, allocation, launches)


def time_events(fn, iters: int = 20, inner: int = 1, queued: bool = False) -> float:
    """Median seconds per call, events around `inner` back-to-back calls (for work too large to
    graph). inner > 1 measures the GPU's throughput as a model's forward sees it, where the host
    queues the next call while the GPU runs this one; with inner = 1 the host's time to launch
    the call's first kernels counts too. queued: the GPU first spins (torch.cuda._sleep) while the
    host queues all `inner` calls, so none of the host's time counts, not even the first call's
    (the steady state of a prefill or perplexity pass, where the host runs ahead)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(QUEUE_CYCLES_PER_CALL * inner)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times)


# ----------------------------------------------------------------------------- ceilings


def copy_bandwidth() -> float:
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), iters=30)
    return 2 * n / t


def fp16_matmul_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    c = torch.empty(n, n, device="cuda", dtype=torch.float16)
    t = time_events(lambda: torch.matmul(a, b, out=c), iters=20)
    return 2 * n**3 / t / 1e12


# ----------------------------------------------------------------------------- matmul


LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # K x N of the rows

LAYOUTS = {  # bpw -> [(bits, fraction of K)], group size 128
    2.5: [(3, 0.5), (2, 0.5)],
    4.0: [(4, 1.0)],
    6.0: [(6, 1.0)],
}


def random_qtensor(K: int, N: int, bpw: float, seed: int, device: str = "cuda") -> QTensor:
    """Random but valid packed tensors (every bit pattern is a valid code)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_pad = (N + 31) // 32 * 32
    groups = []
    for bits, frac in LAYOUTS[bpw]:
        rows = int(round(K * frac / 128)) * 128
        groups += [bits] * (rows // 128)
    while len(groups) * 128 < K:
        groups.append(LAYOUTS[bpw][-1][0])
    groups = groups[: (K + 127) // 128]
    qg, word = [], 0
    for i, b in enumerate(groups):  # the last group may be short (K not a multiple of 128)
        qg += [b, word]
        word += min(128, K - 128 * i) * b // 32
    q_weight = torch.randint(-(2**31), 2**31 - 1, (word, n_pad), generator=g, device=device, dtype=torch.int64).to(torch.int32)
    G = len(groups)
    q_scale = torch.randint(-(2**31), 2**31 - 1, (G, n_pad // 8), generator=g, device=device, dtype=torch.int64).to(torch.int32)
    q_scale_max = (torch.rand(G, generator=g, device=device) * 0.01 + 0.005).half()
    q_groups = torch.tensor(qg, dtype=torch.int16, device=device)
    invperm = torch.argsort(torch.rand(K, generator=g, device=device)).to(torch.int32)
    return QTensor(q_weight, q_scale, q_scale_max, q_groups, invperm, None, K, N)


def weight_bytes(qt: QTensor) -> int:
    return qt.q_weight.numel() * 4 + qt.q_scale.numel() * 4


def matmul_args(x, qt, y):
    return [x.data_ptr(), qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), qt.q_scale_max.data_ptr(),
            qt.q_groups.data_ptr(), qt.perm.data_ptr(), y.data_ptr(), x.shape[0], qt.K, qt.N,
            qt.q_weight.shape[1], qt.q_scale_max.shape[0], True]


def gemv_args(x, qt, y):
    meta, uperm, max_bits, widths = kernels.unit_tables(qt)  # widths: kept alive by the QTensor's cache
    return [x.data_ptr(), qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), meta.data_ptr(), uperm.data_ptr(),
            y.data_ptr(), x.shape[0], qt.K, qt.N, qt.q_weight.shape[1], meta.shape[0], max_bits,
            0 if widths is None else widths.data_ptr()]


def gemv(argsets, warps, ks, kw=0):
    """fn() launching the decode-sized kernel over the rotating weight copies (warps per block, K
    splits, warps along K; 0 = the kernel's choice)."""
    it = [0]

    def fn():
        assert C.exl2_matmul_gemv(*argsets[it[0] % len(argsets)], warps, ks, kw, stream())
        it[0] += 1
    return fn


def bench_matmul(K, N, bpw, Ms, copy_bw, fp16_tflops, rows, quick):
    qt0 = random_qtensor(K, N, bpw, seed=K + N)
    wb = weight_bytes(qt0)
    n_copies = max(2, math.ceil(2 * L2_BYTES / wb))
    qts = [qt0] + [random_qtensor(K, N, bpw, seed=K + N + i) for i in range(1, n_copies)]
    for qt in qts:
        qt.perm  # cache the permutation outside the timed region
    w = torch.empty(K, N, device="cuda", dtype=torch.float16)  # the dequantized weight

    def deq_units(qt):
        meta, uperm = kernels.unit_tables(qt)[:2]  # cached per QTensor
        assert C.dequant_units(qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), meta.data_ptr(),
                               uperm.data_ptr(), w.data_ptr(), N, qt.q_weight.shape[1], meta.shape[0], stream())

    def deq_old(qt):
        C.dequant(qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), qt.q_scale_max.data_ptr(),
                  qt.q_groups.data_ptr(), qt.q_invperm.data_ptr(), w.data_ptr(), K, N,
                  qt.q_weight.shape[1], qt.q_scale_max.shape[0], True, stream())

    def rotating(deq, x=None, y=None):
        """fn(): dequantize the next weight copy, then (with x) y = x @ w."""
        it = [0]

        def fn():
            deq(qts[it[0] % len(qts)])
            it[0] += 1
            if x is not None:
                torch.matmul(x, w, out=y)
        return fn

    for M in Ms:
        x = (torch.randn(M, K, device="cuda") * 0.5).half()
        y = torch.empty(M, N, device="cuda", dtype=torch.float16)
        t_alt = t_deq = t_tc = t_gemv = t_dqm = None
        dequant_path = kernels.uses_dequant(M, K, N, True)  # what kernels.exl2_matmul runs
        if M <= 32:
            argsets = [matmul_args(x, qt, y) for qt in qts]

            def fused(flags):
                it = [0]

                def fn():
                    C.exl2_matmul_cfg(*argsets[it[0] % len(argsets)], stream(), 0, 0, flags)
                    it[0] += 1
                return fn

            # At least 8 calls per replay even in --quick: with 2 copies a replay's own launch cost
            # (~10-20 us) would be split over 2 calls and read as kernel time.
            inner = 4 * len(argsets) if not quick else max(8, len(argsets))
            t = t_tc = time_graph(fused(MATMUL_TC), inner)  # the tensor-core kernel
            t_alt = time_graph(fused(MATMUL_SIMT), inner)  # the SIMT kernel of the previous rounds
            # the decode-sized kernel (up to 32 tokens), the default on sm_90 where kernels.exl2_matmul picks it
            gsets = [gemv_args(x, qt, y) for qt in qts]
            t_gemv = time_graph(gemv(gsets, 0, 0), inner)
            if kernels._gemv_applies(x, N):
                t = t_gemv
            if M >= 8 and K * N >= kernels.DEQUANT_MIN_LINEAR:  # around the crossover to dequant + cuBLAS
                t_dqm = time_graph(rotating(deq_units, x, y), inner)
                if dequant_path:
                    t = t_dqm
        else:
            t = time_events(rotating(deq_units, x, y), iters=10 if quick else 20, inner=LARGE_M_INNER, queued=True)
            t_alt = time_events(rotating(deq_old, x, y), iters=10 if quick else 20, inner=LARGE_M_INNER, queued=True)
            t_deq = time_graph(rotating(deq_units), 2 * len(qts), repeats=7)
        # fp16 cuBLAS baseline of the same product, also graph-timed over two weight copies
        w16s = [torch.randn(K, N, device="cuda", dtype=torch.float16) for _ in range(2)]
        yb = torch.empty(M, N, device="cuda", dtype=torch.float16)
        jt = [0]

        def fb():
            torch.matmul(x, w16s[jt[0] % 2], out=yb)
            jt[0] += 1

        tb = time_graph(fb, 8 if M <= 32 else 2, repeats=7)
        del w16s
        bw = wb / t
        rows.append({
            "K": K, "N": N, "bpw": bpw, "M": M, "us": t * 1e6, "GBps": bw / 1e9, "copy_ratio": bw / copy_bw,
            "TFLOPs": 2 * M * K * N / t / 1e12, "fp16_us": tb * 1e6, "weight_MB": wb / 1e6,
            "path": "dequant+cuBLAS" if dequant_path else "decode-sized" if kernels._gemv_applies(x, N) else "fused",
            "tc_us": None if t_tc is None else t_tc * 1e6,
            # M <= 32 around the crossover: dequant + torch.matmul, graph-timed like the fused kernels
            "dequant_matmul_us": None if t_dqm is None else t_dqm * 1e6,
            "gemv_us": None if t_gemv is None else t_gemv * 1e6,
            # M <= 32: the SIMT fused kernel; M > 32: the previous dequant kernel + cuBLAS
            "alt_us": t_alt * 1e6,
            # M > 32: the dequantization alone, and its bandwidth (packed bytes read + fp16 written)
            "dequant_us": None if t_deq is None else t_deq * 1e6,
            "dequant_copy_ratio": None if t_deq is None else (wb + 2 * K * N) / t_deq / copy_bw,
        })
        r = rows[-1]
        print(f"{K:>6}x{N:<6} {bpw:>4} bpw M={M:<5} {r['us']:9.1f} us  {r['GBps']:7.0f} GB/s  "
              f"{100 * r['copy_ratio']:5.1f}% of copy  {r['TFLOPs']:7.2f} TFLOP/s  fp16 cuBLAS {r['fp16_us']:9.1f} us  "
              f"previous kernel {r['alt_us']:9.1f} us" + ("" if t_tc is None else f"  tensor-core M<=32 kernel {t_tc * 1e6:.1f} us")
              + ("" if t_gemv is None else f"  decode-sized kernel {t_gemv * 1e6:.1f} us")
              + ("" if t_dqm is None else f"  dequant+cuBLAS {t_dqm * 1e6:.1f} us") + ("" if t_deq is None else f"  dequant alone {r['dequant_us']:.1f} us "
              f"({100 * r['dequant_copy_ratio']:.0f}% of copy)"),
              flush=True)
    del qts


def sweep_launch_shapes(copy_bw, rows):
    """K splits (thread-block cluster size) of the tensor-core kernel at M = 1 and 8, 4.0 bpw."""
    for (K, N) in [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672)]:
        qts = [random_qtensor(K, N, 4.0, seed=77 + i) for i in range(max(2, math.ceil(2 * L2_BYTES / (K * N / 2))))]
        wb = weight_bytes(qts[0])
        for M in (1, 8):
            x = (torch.randn(M, K, device="cuda") * 0.5).half()
            y = torch.empty(M, N, device="cuda", dtype=torch.float16)
            argsets = [matmul_args(x, qt, y) for qt in qts]
            for ks in (0, 1, 2, 3, 4, 6, 8):
                it = [0]

                def fn():
                    C.exl2_matmul_cfg(*argsets[it[0] % len(argsets)], stream(), 0, ks, MATMUL_TC)
                    it[0] += 1

                t = time_graph(fn, 4 * len(argsets))
                rows.append({"K": K, "N": N, "M": M, "ks": ks, "us": t * 1e6, "copy_ratio": wb / t / copy_bw})
                print(f"sweep {K}x{N} M={M} 4.0bpw ks={ks or 'default'}: {t * 1e6:7.1f} us  "
                      f"{100 * wb / t / copy_bw:5.1f}% of copy", flush=True)
        del qts


def sweep_gemv(copy_bw, rows, bpws=(4.0,), Ms=(1,), shapes=LLAMA_SHAPES):
    """Warps per block x K splits (cluster size) x warps along K of the decode-sized kernel."""
    for bpw in bpws:
        for (K, N) in shapes:
            q0 = random_qtensor(K, N, bpw, seed=91)
            qts = [q0] + [random_qtensor(K, N, bpw, seed=91 + i) for i in range(1, max(2, math.ceil(2 * L2_BYTES / weight_bytes(q0))))]
            wb = weight_bytes(qts[0])
            for M in Ms:
                x = (torch.randn(M, K, device="cuda") * 0.5).half()
                y = torch.empty(M, N, device="cuda", dtype=torch.float16)
                gsets = [gemv_args(x, qt, y) for qt in qts]
                line = []
                # kw: warps along K (0 with ks 0: the kernel's choice of both)
                for warps, kw in ((2, 0), (4, 0), (4, 2), (4, 4)):
                    for ks in (0, 2, 4, 8, 12, 16):
                        t = time_graph(gemv(gsets, warps, ks, kw), 4 * len(gsets))
                        rows.append({"K": K, "N": N, "bpw": bpw, "M": M, "warps": warps, "ks": ks, "kw": kw,
                                     "us": t * 1e6, "copy_ratio": wb / t / copy_bw})
                        line.append(f"w{warps}/kw{kw or 'd'}/ks{ks or 'd'} {t * 1e6:.1f}")
                n_pad, U, max_bits = gsets[0][9:12]
                plan = C.gemv_plan([(n_pad, U, max_bits)], M, *C.device_gemv_figures(), 0, 0, 0)
                chosen = f"default = w{plan['W']}/kw{plan['kw']}/ks{plan['ks']}" if plan else "default: not applicable"
                print(f"gemv sweep {K}x{N} {bpw} bpw M={M} ({chosen}): " + "  ".join(line), flush=True)
            del qts


# ----------------------------------------------------------------------------- gptq, scales


def bench_gptq(rows, quick):
    from exl2build import kernels

    for K, N in [(4096, 14336), (14336, 4096)]:
        gs = 128
        W = torch.randn(K, N, device="cuda") * 0.02
        # An SPD H^-1 Cholesky factor stand-in: upper triangular with a dominant diagonal.
        hinv = torch.triu(torch.randn(K, K, device="cuda") * 0.01) + torch.eye(K, device="cuda")
        scale = torch.full((N,), 0.002, device="cuda")
        ngroups = K // gs if not quick else 4
        codes = torch.empty(gs, N, dtype=torch.uint8, device="cuda")
        err = torch.empty(gs, N, dtype=torch.float32, device="cuda")
        hblocks = [hinv[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs].contiguous() for i in range(ngroups)]

        def run_kernel_only():
            for i in range(ngroups):
                wg = W[i * gs:(i + 1) * gs]
                C.gptq_group(wg.data_ptr(), hblocks[i].data_ptr(), scale.data_ptr(), codes.data_ptr(),
                             err.data_ptr(), gs, N, 4, stream())

        def run_full():
            for i in range(ngroups):
                s, e = i * gs, (i + 1) * gs
                wg = W[s:e]
                gq = kernels.group_scale_search(wg, 4)
                C.gptq_group(wg.data_ptr(), hblocks[i].data_ptr(), gq[2].data_ptr(), codes.data_ptr(),
                             err.data_ptr(), gs, N, 4, stream())
                if e < K:
                    W[e:] -= hinv[s:e, e:].T @ err

        t_k = time_events(run_kernel_only, iters=3)
        t_f = time_events(run_full, iters=2)
        wg = W[:gs].contiguous()
        t_s = time_events(lambda: kernels.group_scale_search(wg, 4), iters=10)
        r = {"K": K, "N": N, "groups": ngroups, "gptq_rows_per_s": ngroups * gs / t_k,
             "full_rows_per_s": ngroups * gs / t_f, "scale_search_ms": t_s * 1e3, "gptq_group_ms": t_k / ngroups * 1e3}
        rows.append(r)
        print(f"gptq K={K} N={N}: gptq_group {r['gptq_rows_per_s']:.0f} rows/s ({r['gptq_group_ms']:.3f} ms/group); "
              f"with scale search + trailing update {r['full_rows_per_s']:.0f} rows/s; "
              f"group_scale_search (128 x {N}, 97 factors) {r['scale_search_ms']:.3f} ms", flush=True)
        del W, hinv, hblocks


def bench_logits(rows, copy_bw):
    T, V = 2048, 128256
    logits = (torch.randn(T, V, device="cuda") * 4).half()
    targets = torch.randint(0, V, (T,), device="cuda")
    nll = torch.empty(T, device="cuda")
    am = torch.empty(T, dtype=torch.int64, device="cuda")
    t = time_events(lambda: C.logit_stats(logits.data_ptr(), True, T, V, targets.data_ptr(), 0, 0, 0,
                                          nll.data_ptr(), am.data_ptr(), 0, stream()), iters=20)
    bw = T * V * 2 / t
    rows.append({"T": T, "V": V, "us": t * 1e6, "GBps": bw / 1e9, "copy_ratio": bw / copy_bw})
    print(f"logit_stats [{T}, {V}] f16: {t * 1e6:.0f} us, {bw / 1e9:.0f} GB/s ({100 * bw / copy_bw:.0f}% of copy)", flush=True)


# ----------------------------------------------------------------------------- report


def markdown(res) -> str:
    L = []
    L.append(f"Card: {res['card']}; date {res['date']}; torch {res['torch']}; command `{res['command']}`.")
    L.append("")
    L.append(f"Ceilings measured in the same run: device-to-device copy **{res['copy_GBps']:.0f} GB/s** "
             f"(read + write), fp16 matmul (8192^3, cuBLAS) **{res['fp16_TFLOPs']:.0f} TFLOP/s**.")
    L.append("")
    L.append("exl2_matmul (f16 in/out; group size 128; 2.5 bpw = 50% 3-bit + 50% 2-bit). Time = median per call of "
             "CUDA-graph replays, weights rotated over copies larger than L2. GB/s = packed weight bytes "
             "(q_weight + q_scale) / time. path and us: what kernels.exl2_matmul runs (\"fused\" = the tensor-core "
             "kernel); the tensor-core, decode-sized and dequant+cuBLAS columns time each path alone at M <= 32 "
             "(\"previous\" = the SIMT fused kernel). M = 2048: events around 5 back-to-back calls of unit dequant + "
             "torch.matmul (\"previous\" = the old dequant kernel + torch.matmul; \"dequant\" = the unit "
             "dequantizer alone, % of copy counting packed bytes read + fp16 written).")
    L.append("")
    L.append("| K x N | bpw | M | path | us | GB/s | % of copy | TFLOP/s | fp16 cuBLAS us | previous us | "
             "tensor-core us | decode-sized us | dequant+cuBLAS us | dequant us (% of copy) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def us(r, key):
        return "" if r.get(key) is None else f"{r[key]:.1f}"

    for r in res["matmul"]:
        dq = "" if r.get("dequant_us") is None else f"{r['dequant_us']:.1f} ({100 * r['dequant_copy_ratio']:.0f})"
        L.append(f"| {r['K']}x{r['N']} | {r['bpw']} | {r['M']} | {r['path']} | {r['us']:.1f} | {r['GBps']:.0f} | "
                 f"{100 * r['copy_ratio']:.1f} | {r['TFLOPs']:.2f} | {r['fp16_us']:.1f} | {r['alt_us']:.1f} | "
                 f"{us(r, 'tc_us')} | {us(r, 'gemv_us')} | {us(r, 'dequant_matmul_us')} | {dq} |")
    L.append("")
    if res.get("sweep"):
        L.append("K splits of the tensor-core kernel (ks = blocks of a thread-block cluster sharing one column tile; "
                 "0 = the default choice), 4.0 bpw:")
        L.append("")
        L.append("| K x N | M | ks | us | % of copy |")
        L.append("|---|---|---|---|---|")
        for r in res["sweep"]:
            L.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['ks']} | {r['us']:.1f} | {100 * r['copy_ratio']:.1f} |")
        L.append("")
    L.append("GPTQ over a whole linear (4-bit, groups of 128 rows):")
    L.append("")
    L.append("| K | N | gptq_group rows/s | ms per group | rows/s incl. scale search + trailing update | "
             "group_scale_search ms (128 x N, 97 factors) |")
    L.append("|---|---|---|---|---|---|")
    for r in res["gptq"]:
        L.append(f"| {r['K']} | {r['N']} | {r['gptq_rows_per_s']:.0f} | {r['gptq_group_ms']:.3f} | "
                 f"{r['full_rows_per_s']:.0f} | {r['scale_search_ms']:.3f} |")
    L.append("")
    for r in res["logits"]:
        L.append(f"logit_stats [{r['T']}, {r['V']}] f16: {r['us']:.0f} us, {r['GBps']:.0f} GB/s "
                 f"({100 * r['copy_ratio']:.0f}% of copy).")
    L.append("")
    L.append("Not measured yet: exllamav2 0.3.2's own kernels side by side.")
    return "\n".join(L) + "\n"


def sanitize_pass():
    """Every CUDA kernel once on small shapes (run under compute-sanitizer), each x staging included."""
    from exl2build import kernels

    torch.manual_seed(0)
    codes = torch.randint(0, 8, (64, 40), dtype=torch.uint8, device="cuda")
    packed = kernels.pack_codes(codes, 3)
    assert torch.equal(kernels.unpack_codes(packed, 3, 64), codes)
    qs = torch.randint(1, 17, (3, 64), dtype=torch.uint8, device="cuda")
    assert torch.equal(kernels.unpack_scales(kernels.pack_scales(qs), 64), qs)
    w = torch.randn(128, 200, device="cuda") * 0.02
    q, smax, scale = kernels.group_scale_search(w, 4)
    kernels.quantize_rows(w, scale, 4)
    h = torch.triu(torch.randn(128, 128, device="cuda") * 0.01) + torch.eye(128, device="cuda")
    kernels.gptq_group(w.clone(), h, scale, 4)
    for K, N, bpw in [(1024, 200, 2.5), (4096, 352, 4.0), (1024, 4096, 6.0)]:
        qt = random_qtensor(K, N, bpw, seed=1)
        kernels.dequant(qt)
        for M in (1, 3, 8, 16, 32):
            x = torch.randn(M, K, device="cuda").half()
            kernels.exl2_matmul(x, qt)
            kernels.exl2_matmul_swiglu(x, torch.randn_like(x), qt)  # the down projection's SiLU*up staging
            for cpt, ks, flags in ((1, 1, 0), (2, 4, 0), (1, 8, 1), (2, 2, 4), (2, 3, 2), (0, 1, 8), (0, 3, 8),
                                   (0, 5, 16), (0, 0, 16)):
                y = torch.empty(M, N, device="cuda", dtype=torch.float16)
                C.exl2_matmul_cfg(*matmul_args(x, qt, y), stream(), cpt, ks, flags)
            if M <= 8:  # (warps, K splits, warps along K), the last two with warps splitting a block's units
                for warps, ks, kw in ((2, 1, 0), (4, 3, 0), (4, 16, 0), (2, 9, 0), (4, 12, 2), (4, 3, 4)):
                    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
                    gemv([gemv_args(x, qt, y)], warps, ks, kw)()
    logits = torch.randn(5, 3001, device="cuda").half()
    t = torch.randint(0, 3001, (5,), device="cuda")
    lp = torch.log_softmax(torch.randn(5, 3001, device="cuda"), 1).topk(8, 1)
    kernels.logit_stats(logits, t, lp.indices.int().contiguous(), lp.values.contiguous())
    kernels.logit_stats(logits.float(), t)
    # The forward pass's fused kernels: norms (rows of 576 and 4096, with and without a residual),
    # RoPE + cache writes, SiLU*up, and decode attention (GQA; one and several key batches per block;
    # with and without RoPE in its launch).
    for dim in (576, 4096):
        h = torch.randn(3, dim, device="cuda").half()
        wf = torch.rand(dim, device="cuda")
        kernels.rms_norm(h, wf, 1e-5)
        kernels.rms_norm(h, wf, 1e-5, residual=torch.randn_like(h))
    B, T, H, Hkv, D, L = 2, 3, 8, 2, 64, 600
    q, k, v = (torch.randn(B, T, n * D, device="cuda").half() for n in (H, Hkv, Hkv))
    kc, vc = (torch.randn(B, Hkv, L, D, device="cuda").half() for _ in range(2))
    cos, sin = torch.randn(T, D, device="cuda").half(), torch.randn(T, D, device="cuda").half()
    kernels.rope_cache(q, k, v, cos, sin, kc, vc, 5)
    kernels.silu_mul(k, v)
    for pos in (0, 37, L - 1):
        p = torch.tensor([pos], device="cuda")
        kernels.decode_attention(q[:, :1].contiguous(), kc, vc, p)
        # with RoPE and the cache stores in the same launch
        kernels.decode_attention(q[:, :1].contiguous(), kc, vc, p,
                                 new=(k[:, :1].contiguous(), v[:, :1].contiguous(), cos[:1], sin[:1]))
    torch.cuda.synchronize()
    print("sanitize pass done")


def profile_pass(bpws=(4.0,), shape=(4096, 14336)):
    """For Nsight Compute, K x N (default 4096x14336) at M = 1: one launch of the decode-sized
    kernel per bpw, in that order, then one of the tensor-core and SIMT kernels at the first bpw."""
    K, N = shape
    x = (torch.randn(1, K, device="cuda") * 0.5).half()
    y = torch.empty(1, N, device="cuda", dtype=torch.float16)
    qts = [random_qtensor(K, N, b, seed=3) for b in bpws]
    for qt in qts:
        gemv([gemv_args(x, qt, y)], 0, 0)()
    qt = qts[0]
    for flags in (MATMUL_TC, MATMUL_SIMT):
        C.exl2_matmul_cfg(*matmul_args(x, qt, y), stream(), 0, 0, flags)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sanitize", action="store_true", help="run every kernel once on small shapes and exit")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="with --gemv: only the ceilings and the sweep")
    ap.add_argument("--sweep-m", default="1", help="with --gemv: comma-separated token counts of the sweep")
    ap.add_argument("--sweep-bpw", default=None, help="with --gemv: comma-separated bpws of the sweep (default 2.5,4.0,6.0; 4.0 with --quick)")
    ap.add_argument("--gemv-m", default="1,8,16,32", help="with --gemv: comma-separated token counts of the kernel rows")
    ap.add_argument("--shapes", default=None, help="with --gemv: comma-separated KxN of the rows and the sweep "
                    "(default: the Llama shapes)")
    ap.add_argument("--gemv", action="store_true", help="only the ceilings, the kernel rows at --gemv-m tokens, and the decode-sized kernel's sweep")
    ap.add_argument("--profile", action="store_true", help="launch the fused kernels for ncu and exit")
    ap.add_argument("--profile-bpw", default="4.0", help="with --profile: comma-separated bpws of the decode-sized kernel's launches")
    ap.add_argument("--profile-shape", default="4096x14336", help="with --profile: K x N of the profiled product")
    args = ap.parse_args()
    if args.profile:
        profile_pass(tuple(float(b) for b in args.profile_bpw.split(",")),
                     tuple(int(v) for v in args.profile_shape.split("x")))
        return
    if args.sanitize:
        sanitize_pass()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {
        "card": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
        "sms": C.device_sm_count(),
    }
    res["copy_GBps"] = copy_bandwidth() / 1e9
    res["fp16_TFLOPs"] = fp16_matmul_tflops()
    print(f"card {res['card']} ({res['sms']} SMs): copy {res['copy_GBps']:.0f} GB/s, fp16 matmul {res['fp16_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    copy_bw = res["copy_GBps"] * 1e9
    res["matmul"], res["sweep"], res["gptq"], res["logits"], res["gemv_sweep"] = [], [], [], [], []
    shapes = LLAMA_SHAPES
    Ms = [1, 8, 32, 2048]
    if args.gemv:
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        gemv_ms = [int(m) for m in args.gemv_m.split(",")]
        for K, N in shapes if not args.sweep_only else []:
            for bpw in (2.5, 4.0, 6.0) if not args.quick else (4.0,):
                bench_matmul(K, N, bpw, gemv_ms, copy_bw, res["fp16_TFLOPs"], res["matmul"], True)
        if not args.no_sweep:
            bpws = args.sweep_bpw or ("4.0" if args.quick else "2.5,4.0,6.0")
            sweep_gemv(copy_bw, res["gemv_sweep"], [float(b) for b in bpws.split(",")],
                       [int(m) for m in args.sweep_m.split(",")], shapes)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    for K, N in shapes:
        for bpw in (2.5, 4.0, 6.0):
            bench_matmul(K, N, bpw, Ms, copy_bw, res["fp16_TFLOPs"], res["matmul"], args.quick)
    if not args.no_sweep:
        sweep_launch_shapes(copy_bw, res["sweep"])
    bench_gptq(res["gptq"], args.quick)
    bench_logits(res["logits"], copy_bw)
    md = markdown(res)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
