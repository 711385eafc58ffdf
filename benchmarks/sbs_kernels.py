"""exllamav2 0.3.2's EXL2 matmul and GPTQ kernels against ours on the same tensors, same card, same run.

Measures (device_side_by_side.sh STAGE=kernels):
  * matmul: for K x N in 4096x4096, 4096x14336, 14336x4096, 8192x28672, bpw 2.5 (50% 3-bit + 50%
    2-bit) / 4.0 / 6.0, group size 128, M = 1, 8, 32, 2048. One EXL2 tensor is packed by our
    format code (format.exl2.build_qtensor: kernels.pack_codes / pack_scales, random codes and
    scales); exactly its tensors (q_weight, q_perm = argsort(q_invperm), q_invperm, q_scale,
    q_scale_max, q_groups; exllamav2's own make_q_matrix helper adds q_group_map, converts the
    permutations to int16 and divides q_scale_max by 256 on its private copies, and shuffles
    its copy of q_weight in place) go to exllamav2's ext_c.make_q_matrix / gemm_half_q_half.
    Ours: kernels.exl2_matmul (fused kernel for M <= 32, dequant + torch.matmul above); theirs:
    gemm_half_q_half (its kernel for M <= 32, reconstruct + cublasHgemm above). Timing as
    benchmarks/kernels.py (its time_graph / time_events are imported): M <= 32 median per call of
    CUDA-graph replays, weights rotated over copies larger than L2, exllamav2's per-shape
    block-size autotune (200 timed calls) run to completion before capture; M = 2048 events
    around 5 back-to-back calls (the throughput a model's prefill sees: the host queues the next
    call while the GPU runs one). Both outputs are checked against each other and against x @ dequant(W)
    in float32.
  * GPTQ over a whole linear, 4-bit, groups of 128 rows, the same W, H and H^-1 factor for both:
    (1) the per-group kernel loop: ours kernels.group_scale_search (97 factors on [0.70, 1.20],
    exllamav2's grid) + kernels.gptq_group + the trailing update, vs exllamav2's
    AdaptiveQuantizer.find_params (ext_c.quantize_err) + ext_c.quantize_range (per row
    fused_quantize_adjust + vv_mul_sub, then the trailing addmm), exactly as its
    AdaptiveGPTQ.quantize drives them; (2) one linear as each converter does it: ours
    quant.gptq.quantize_linear (Hessian prep in float64, GPTQ, packing, verified dequant) vs
    exllamav2's AdaptiveGPTQ prepare() + quantize() + pack() (its damping 0.12, H^-1 kept on the
    host between calls, as in its converter). K = 4096 (N = 14336) and K = 14336 (N = 4096).
    Quality check: sum(E * (H E)) / sum(W * (H W)) with E = W - Q for both.
Results: <out>/kernels.json, <out>/kernels.md (also printed).

    python benchmarks/sbs_kernels.py --out $OUT [--quick]
    python benchmarks/sbs_kernels.py --smoke --out /tmp/sbs-kern   # CPU, small shapes, exllamav2 parts fail (logged)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sbs_common as sc  # noqa: E402

LAYOUTS = {2.5: [(3, 0.5), (2, 0.5)], 4.0: [(4, 1.0)], 6.0: [(6, 1.0)]}  # as benchmarks/kernels.py
GROUP = 128
AGREE = 1e-2  # max |y_ours - y_exl2| / max |y| below which the two outputs count as the same product
AUTOTUNE_CALLS = 210  # exllamav2 times 200 calls per (M, K, N) before it fixes its block size
LARGE_M_INNER = 5  # M = 2048: events around this many back-to-back calls (as benchmarks/kernels.py)


def build_qt(torch, K: int, N: int, bpw: float, seed: int, device):
    """An EXL2 QTensor packed by our format code, random codes/scales (every bit pattern is valid)."""
    from exl2build.format.exl2 import build_qtensor

    g = torch.Generator(device=device).manual_seed(seed)
    widths = []
    for bits, frac in LAYOUTS[bpw]:
        widths += [bits] * int(round(K * frac / GROUP))
    widths = (widths + [LAYOUTS[bpw][-1][0]] * (K // GROUP))[: K // GROUP]
    groups = []
    for b in widths:
        codes = torch.randint(0, 2**b, (GROUP, N), generator=g, device=device, dtype=torch.int32).to(torch.uint8)
        qscale = torch.randint(1, 17, (N,), generator=g, device=device, dtype=torch.int32).to(torch.uint8)
        smax = torch.rand((), generator=g, device=device) * 0.01 + 0.005
        groups.append((b, codes, qscale, smax))
    invperm = torch.argsort(torch.rand(K, generator=g, device=device)).to(torch.int32)
    return build_qtensor(groups, invperm, N)


def weight_bytes(qt) -> int:
    return qt.q_weight.numel() * 4 + qt.q_scale.numel() * 4


class Timers:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        if device.type == "cuda":
            kb = sc.bench_kernels()
            self.graph, self.events = kb.time_graph, kb.time_events
            self.L2 = kb.L2_BYTES
        else:
            self.graph = lambda fn, inner, repeats=5: self._cpu(fn, inner, repeats)
            self.events = lambda fn, iters=5, inner=1, queued=False: self._cpu(fn, inner, iters)
            self.L2 = 1 << 20

    @staticmethod
    def _cpu(fn, inner, repeats):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t) / inner)
        return statistics.median(ts)


# ----------------------------------------------------------------------------- matmul


def exl2_handle(torch, ext, qt, temp_dq):
    """exllamav2's QMatrix over copies of our tensors (make_q_matrix shuffles q_weight in place)."""
    w = {"q_weight": qt.q_weight.clone(), "q_perm": qt.perm.clone(), "q_invperm": qt.q_invperm.clone(),
         "q_scale": qt.q_scale.clone(), "q_scale_max": qt.q_scale_max.clone(), "q_groups": qt.q_groups.clone()}
    h = ext.make_q_matrix(w, temp_dq, max_dq_rows=qt.K)
    return h, w  # w must stay alive as long as the handle


def matmul_shape(torch, a, tm: Timers, K, N, bpw, Ms, rows: list, copy_bw):
    from exl2build import kernels

    dev = tm.device
    qt0 = build_qt(torch, K, N, bpw, seed=K + N, device=dev)
    wb = weight_bytes(qt0)
    n = max(2, math.ceil(2 * tm.L2 / wb))
    qts = [qt0] + [build_qt(torch, K, N, bpw, seed=K + N + i, device=dev) for i in range(1, n)]
    n_pad = qt0.n_pad
    for qt in qts:  # validate + cache perm outside any capture
        kernels.exl2_matmul(torch.zeros(1, K, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32), qt)
    ext = ext_c = None
    handles, ext_err = [], None
    try:
        import exllamav2.ext as ext  # noqa: F811
        from exllamav2.ext import exllamav2_ext as ext_c  # noqa: F811

        temp_dq = torch.empty(K * n_pad, dtype=torch.float16, device=dev)
        handles = [exl2_handle(torch, ext, qt, temp_dq) for qt in qts]
    except Exception as e:  # noqa: BLE001 - our side still gets measured
        import traceback

        traceback.print_exc()
        ext_err = f"{type(e).__name__}: {e}"
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    for M in Ms:
        x = (torch.randn(M, K, device=dev) * 0.5).to(dt)
        r = {"K": K, "N": N, "bpw": bpw, "M": M, "weight_MB": wb / 1e6, "copies": n,
             "ours_path": "dequant+torch.matmul" if kernels.uses_dequant(M, K, N, dt == torch.float16) else "fused"}
        it = [0]

        def ours():
            kernels.exl2_matmul(x, qts[it[0] % n])
            it[0] += 1

        iters = 10 if a.quick else 20  # event-timed samples (M > 32)
        r["ours_us"] = (tm.graph(ours, 4 * n if not a.quick else max(8, n)) if M <= 32 else
                        tm.events(ours, iters=iters, inner=LARGE_M_INNER, queued=True)) * 1e6
        if M > 32:  # as sessions 5-15 timed it: the first call's host time counts (1 / LARGE_M_INNER of it)
            r["ours_unqueued_us"] = tm.events(ours, iters=iters, inner=LARGE_M_INNER) * 1e6
        if M <= 32 and dev.type == "cuda":
            # Both of our fused kernels, forced (the default takes SIMT at M = 1, tensor cores above).
            from exl2build import _native

            yk = torch.empty(M, N, device=dev, dtype=torch.float16)
            argsets = [[x.data_ptr(), q.q_weight.data_ptr(), q.q_scale.data_ptr(), q.q_scale_max.data_ptr(),
                        q.q_groups.data_ptr(), q.perm.data_ptr(), yk.data_ptr(), M, K, N, q.q_weight.shape[1],
                        q.q_scale_max.shape[0], True] for q in qts]
            for key, flags in (("ours_tc_us", 16), ("ours_simt_us", 8)):
                kt = [0]

                def forced():
                    _native.cuda.exl2_matmul_cfg(*argsets[kt[0] % n], torch.cuda.current_stream().cuda_stream,
                                                 0, 0, flags)
                    kt[0] += 1

                r[key] = tm.graph(forced, 4 * n if not a.quick else max(8, n)) * 1e6
            # The decode-sized kernel with its own launch plan, also where exl2_matmul takes another
            # path (the crossovers of kernels._gemv_applies are measured here, beside exllamav2).
            descs = [kernels.gemv_desc(q, yk) for q in qts]

            def launch_gemv(d):  # False where the kernel declines the shape
                return _native.cuda.exl2_matmul_gemv(x.data_ptr(), *d[:5], M, K, *d[5:], 0, 0, 0,
                                                     torch.cuda.current_stream().cuda_stream)

            if all(d is not None for d in descs) and launch_gemv(descs[0]):
                gt = [0]

                def gemv_default():
                    launch_gemv(descs[gt[0] % n])
                    gt[0] += 1

                r["ours_gemv_us"] = tm.graph(gemv_default, 4 * n if not a.quick else max(8, n)) * 1e6
        ref = x.float() @ kernels.dequant(qts[0], torch.float32)
        y_o = kernels.exl2_matmul(x, qts[0]).float()
        scale = ref.abs().max().item() or 1.0
        r["ours_vs_ref"] = (y_o - ref).abs().max().item() / scale
        if handles:
            try:
                y = torch.empty(M, n_pad, device=dev, dtype=torch.float16)
                jt = [0]

                def theirs():
                    ext_c.gemm_half_q_half(x, handles[jt[0] % n][0], y, False)
                    jt[0] += 1

                if M <= 32:
                    for _ in range(AUTOTUNE_CALLS):  # exllamav2's autotune syncs: finish it before graph capture
                        theirs()
                    torch.cuda.synchronize()
                    r["exl2_us"] = tm.graph(theirs, 4 * n if not a.quick else max(8, n)) * 1e6
                else:
                    r["exl2_us"] = tm.events(theirs, iters=iters, inner=LARGE_M_INNER, queued=True) * 1e6
                    r["exl2_unqueued_us"] = tm.events(theirs, iters=iters, inner=LARGE_M_INNER) * 1e6
                r["exl2_path"] = "kernel" if M <= 32 else "reconstruct+cublasHgemm"
                y_t = torch.empty(M, n_pad, device=dev, dtype=torch.float16)
                ext_c.gemm_half_q_half(x, handles[0][0], y_t, False)
                y_t = y_t[:, :N].float()
                r["exl2_vs_ref"] = (y_t - ref).abs().max().item() / scale
                r["ours_vs_exl2"] = (y_o - y_t).abs().max().item() / scale
                r["agree"] = r["ours_vs_exl2"] < AGREE
                r["exl2_over_ours"] = r["exl2_us"] / r["ours_us"]
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                r["exl2_error"] = f"{type(e).__name__}: {e}"
        else:
            r["exl2_error"] = ext_err
        for who in ("ours", "exl2"):
            if r.get(f"{who}_us"):
                r[f"{who}_GBps"] = wb / (r[f"{who}_us"] * 1e-6) / 1e9
                if copy_bw:
                    r[f"{who}_copy_ratio"] = wb / (r[f"{who}_us"] * 1e-6) / copy_bw
        rows.append(r)
        print(f"{K:>6}x{N:<6} {bpw} bpw M={M:<5} ours {r['ours_us']:9.1f} us (tc {sc.fmt(r.get('ours_tc_us'), '.1f')}, "
              f"simt {sc.fmt(r.get('ours_simt_us'), '.1f')}, gemv {sc.fmt(r.get('ours_gemv_us'), '.1f')})  exllamav2 "
              f"{sc.fmt(r.get('exl2_us'), '9.1f')} us  ratio {sc.fmt(r.get('exl2_over_ours'), '.2f')}  "
              f"err ours/exl2/diff {sc.fmt(r.get('ours_vs_ref'), '.1e')}/{sc.fmt(r.get('exl2_vs_ref'), '.1e')}/"
              f"{sc.fmt(r.get('ours_vs_exl2'), '.1e')}" + (f"  unqueued ours/exl2 {sc.fmt(r.get('ours_unqueued_us'), '.1f')}/"
              f"{sc.fmt(r.get('exl2_unqueued_us'), '.1f')} us" if M > 32 else ""), flush=True)
    if ext_c is not None:
        for h, _ in handles:
            ext_c.free_q_matrix(h)
    del handles, qts


# ----------------------------------------------------------------------------- GPTQ


def gptq_inputs(torch, K, N, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    W0 = torch.randn(K, N, generator=g, device=dev) * 0.02
    T = 4096 if dev.type == "cuda" else 512
    X = torch.randn(T, K, generator=g, device=dev) * (torch.rand(K, generator=g, device=dev) * 2 + 0.05)
    H = X.T @ X / T
    d = torch.arange(K, device=dev)
    Hd = H.clone()
    Hd[d, d] += 0.01 * torch.diag(H).mean()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).contiguous()
    return W0, H, U


def rel_loss(W0, Q, H) -> float:
    E = W0 - Q
    return float((E * (H @ E)).sum() / (W0 * (H @ W0)).sum())



def gptq_compare(torch, a, dev, K, N) -> dict:
    from exl2build import kernels
    from exl2build.quant.gptq import ScaleSearch, quantize_linear
    from exl2build.quant.options import LinearOption

    W0, H, U = gptq_inputs(torch, K, N, dev)
    W = W0.clone()
    out = {"K": K, "N": N, "groups": K // GROUP, "bits": 4}
    reps = 2 if a.quick else 3

    def ours_loop():
        for s in range(0, K, GROUP):
            e = s + GROUP
            _, _, scale = kernels.group_scale_search(W[s:e].contiguous(), 4, 0.70, 1.20, 97, 3.5)
            _, err = kernels.gptq_group(W[s:e], U[s:e, s:e].contiguous(), scale, 4)
            if e < K:
                W[e:] -= torch.matmul(U[s:e, e:].T, err)

    t, ts = sc.timed(torch, dev, lambda: W.copy_(W0), ours_loop, reps)
    out.update(ours_loop_s=t, ours_loop_runs=ts, ours_loop_rows_per_s=K / t, ours_loop_rel_loss=rel_loss(W0, W, H))
    print(f"gptq loop K={K} N={N}: ours {t * 1e3:.1f} ms ({K / t:.0f} rows/s)", flush=True)

    layer_w = W0.T.contiguous().half()
    ss = ScaleSearch(0.70, 1.20, 97, 3.5)
    opt = LinearOption(GROUP, (4,), (1.0,))
    box = {}

    def ours_whole():
        box["qt"], box["deq"] = quantize_linear(layer_w, H, opt, ss, name="bench")

    t, ts = sc.timed(torch, dev, lambda: None, ours_whole, reps)
    out.update(ours_linear_s=t, ours_linear_runs=ts,
               ours_linear_rel_loss=rel_loss(W0, box["deq"].T.float(), H))
    print(f"gptq linear K={K} N={N}: ours quantize_linear {t * 1e3:.1f} ms", flush=True)

    try:
        from exllamav2.conversion.adaptivegptq import AdaptiveGPTQ, AdaptiveQuantizer
        from exllamav2.conversion.qparams import QParams
        from exllamav2.ext import exllamav2_ext as ext_c
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        out["exl2_error"] = f"{type(e).__name__}: {e}"
        return out

    try:
        _theirs_gptq(torch, a, dev, K, N, W0, W, H, U, out, box, layer_w, reps, AdaptiveGPTQ, AdaptiveQuantizer, QParams, ext_c)
    except Exception as e:  # noqa: BLE001 - keep our figures
        import traceback

        traceback.print_exc()
        out["exl2_error"] = f"{type(e).__name__}: {e}"
    return out


def _theirs_gptq(torch, a, dev, K, N, W0, W, H, U, out, box, layer_w, reps, AdaptiveGPTQ, AdaptiveQuantizer, QParams, ext_c):
    """exllamav2's side of gptq_compare (its figures go into `out`)."""
    quant = torch.zeros_like(W0)
    qweight = torch.zeros(K, N, dtype=torch.short, device=dev)
    error = W0.clone()

    def setup_theirs():
        W.copy_(W0)
        error.copy_(W0)
        quant.zero_()

    def theirs_loop():  # the group loop of AdaptiveGPTQ.quantize
        quantizer = AdaptiveQuantizer(bits=4, scale_bits=4)
        for s in range(0, K, GROUP):
            e = s + GROUP
            quantizer.find_params(W[s:e, :])
            ext_c.quantize_range(quant, quantizer.scale, qweight, quantizer.qzero, quantizer.maxq, U, W, error, s, e)

    t, ts = sc.timed(torch, dev, setup_theirs, theirs_loop, reps)
    out.update(exl2_loop_s=t, exl2_loop_runs=ts, exl2_loop_rows_per_s=K / t, exl2_loop_rel_loss=rel_loss(W0, quant, H))
    out["exl2_loop_over_ours"] = out["exl2_loop_s"] / out["ours_loop_s"]
    print(f"gptq loop K={K} N={N}: exllamav2 {t * 1e3:.1f} ms ({K / t:.0f} rows/s)", flush=True)

    layer = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.float16)
    layer.weight.data = layer_w

    def theirs_whole():
        # Its converter runs the whole per-linear sequence under inference mode (pack writes into
        # tensors that quantize created there; outside, torch refuses the in-place update).
        with torch.inference_mode():
            lq = AdaptiveGPTQ(layer)
            lq.hessian = H.clone()
            lq.num_batches = 1
            lq.prepare()
            lq.configure({4: GROUP}, [4], [1], 4)
            lq.quantize(keep_qweight=True, apply=False)
            lq.pack("bench", QParams({4: GROUP}, [4], [1], 4))
            box["exl2_quant"] = lq.quant[lq.invperm, :].clone()  # dequantized W^T in original row order

    t, ts = sc.timed(torch, dev, lambda: None, theirs_whole, reps)
    out.update(exl2_linear_s=t, exl2_linear_runs=ts, exl2_linear_rel_loss=rel_loss(W0, box["exl2_quant"].float(), H))
    out["exl2_linear_over_ours"] = out["exl2_linear_s"] / out["ours_linear_s"]
    print(f"gptq linear K={K} N={N}: exllamav2 AdaptiveGPTQ {t * 1e3:.1f} ms", flush=True)


# ----------------------------------------------------------------------------- report


def markdown(res: sc.Results) -> str:
    env = res.data["env"]
    L = ["# EXL2 kernels: exl2build vs exllamav2 0.3.2 on the same tensors", "",
         f"GPU: {env.get('gpu')}; torch {env.get('torch')} (CUDA {env.get('cuda')}); {res.data['started']}. "
         f"Command: `{res.data.get('command')}`.", ""]
    ceil = res.result("ceilings") or {}
    if ceil:
        L += [f"Copy bandwidth in the same run: {sc.fmt(ceil.get('copy_GBps'), '.0f')} GB/s (read + write).", ""]
    rows = []
    for name, p in res.data["parts"].items():
        if name.startswith("matmul_") and (p.get("status") == "ok" or p.get("result_partial")):
            for r in p.get("result") or p.get("result_partial"):
                rows.append([f"{r['K']}x{r['N']}", r["bpw"], r["M"], sc.fmt(r.get("ours_us"), ".1f"), sc.fmt(r.get("ours_gemv_us"), ".1f"), sc.fmt(r.get("exl2_us"), ".1f"),
                             sc.fmt(r.get("exl2_over_ours"), ".2f"), sc.fmt(100 * r["ours_copy_ratio"], ".1f") if r.get("ours_copy_ratio") else "–",
                             sc.fmt(100 * r["exl2_copy_ratio"], ".1f") if r.get("exl2_copy_ratio") else "–",
                             sc.fmt(r.get("ours_vs_exl2"), ".1e") + ("" if r.get("agree", True) else " **DIFFER**"), sc.fmt(r.get("ours_vs_ref"), ".1e"), sc.fmt(r.get("exl2_vs_ref"), ".1e")])
    L += ["## Quantized matmul (f16, group 128; us per call; ratio > 1: exllamav2 slower)", "",
          "M <= 32: ours fused kernel (the one exl2_matmul takes; beside it the decode-sized kernel with its own plan) vs exllamav2's kernel (CUDA-graph replays); M = 2048: ours dequant + torch.matmul vs "
          "exllamav2 reconstruct + cublasHgemm (events around 5 back-to-back calls, queued by the host while the GPU first spins, "
          "so no host time counts; kernels.json's *_unqueued_us keys hold the times with the first call's host time, as sessions 5-15 measured). Errors: max |y - y'| / max |x @ W| (W dequantized in f32).", "",
          sc.md_table(["K x N", "bpw", "M", "exl2build us", "decode-sized kernel us", "exllamav2 us", "exllamav2 / exl2build", "exl2build % of copy",
                       "exllamav2 % of copy", "ours vs exl2", "ours vs ref", "exl2 vs ref"], rows), ""]
    rows = []
    for name, p in res.data["parts"].items():
        if name.startswith("gptq_") and p.get("status") == "ok":
            r = p["result"]
            rows.append([r["K"], r["N"], sc.fmt(1e3 * r["ours_loop_s"], ".1f"), sc.fmt(1e3 * r["exl2_loop_s"], ".1f") if r.get("exl2_loop_s") else "–",
                         sc.fmt(r.get("exl2_loop_over_ours"), ".2f"), sc.fmt(1e3 * r["ours_linear_s"], ".1f"),
                         sc.fmt(1e3 * r["exl2_linear_s"], ".1f") if r.get("exl2_linear_s") else "–", sc.fmt(r.get("exl2_linear_over_ours"), ".2f"),
                         f"{sc.fmt(r.get('ours_loop_rel_loss'), '.2e')} / {sc.fmt(r.get('exl2_loop_rel_loss'), '.2e')}"])
    L += ["## GPTQ, one linear, 4-bit, groups of 128 (ms; same W, H and H^-1 factor)", "",
          "loop = scale search (97 factors on [0.70, 1.20] for both) + in-group GPTQ + trailing update per group; "
          "linear = the whole per-linear work of each converter (ours quantize_linear incl. float64 Hessian prep, packing and "
          "the dequant check; exllamav2 AdaptiveGPTQ prepare + quantize + pack, damping 0.12). Rel. loss = "
          "sum(E*(H E)) / sum(W*(H W)) of the loop results.", "",
          sc.md_table(["K", "N", "ours loop ms", "exllamav2 loop ms", "ratio", "ours linear ms", "exllamav2 linear ms", "ratio",
                       "rel. loss ours / exl2"], rows), ""]
    errs = set()
    for p in res.data["parts"].values():
        r = p.get("result") or p.get("result_partial")
        for x in (r if isinstance(r, list) else [r] if isinstance(r, dict) else []):
            if isinstance(x, dict) and x.get("exl2_error"):
                errs.add(x["exl2_error"].splitlines()[0][:300])
    bad = sc.part_status_lines(res) + [f"- exllamav2 side: {e}" for e in sorted(errs)]
    if bad:
        L += ["## Failures / skipped parts", ""] + bad + [""]
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer replays/iterations")
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--ms", default="1,8,32,2048", help="comma-separated token counts of the matmul rows")
    ap.add_argument("--smoke", action="store_true", help="CPU, small shapes")
    a = ap.parse_args()
    import exl2build  # noqa: F401  (OMP wait policy before torch)
    import torch

    dev = torch.device("cpu" if a.smoke else "cuda")
    res = sc.Results(a.out, "kernels")
    res.set("command", " ".join(sys.argv))
    torch.backends.cuda.matmul.allow_tf32 = False
    tm = Timers(torch, dev)
    copy_bw = None
    if dev.type == "cuda":
        kb = sc.bench_kernels()
        c = res.part("ceilings", lambda: {"copy_GBps": kb.copy_bandwidth() / 1e9, "card": torch.cuda.get_device_name()})
        copy_bw = c["copy_GBps"] * 1e9 if c else None
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)] if not a.smoke else [(256, 512), (512, 256)]
    Ms = [int(m) for m in a.ms.split(",")] if not a.smoke else [1, 8, 40]
    for K, N in shapes:
        for bpw in (2.5, 4.0, 6.0):
            rows: list = []
            name = f"matmul_{K}x{N}_{bpw}"
            if res.part(name, lambda: (matmul_shape(torch, a, tm, K, N, bpw, Ms, rows, copy_bw), rows)[1], need_s=15) is None and rows:
                res.data["parts"][name]["result_partial"] = rows  # the Ms measured before the failure
                res.save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if not a.no_gptq:
        for K, N in ([(4096, 14336), (14336, 4096)] if not a.smoke else [(256, 512)]):
            res.part(f"gptq_{K}x{N}", gptq_compare, torch, a, dev, K, N, need_s=40)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    md = markdown(res)
    (a.out / "kernels.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
