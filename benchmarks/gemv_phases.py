"""Where a launch of the decode-sized kernel spends its time, from its own phase stamps.

Needs the diagnostic build (the stamps cost a few instructions per block, so they are compiled in
only on request):

    EXL2BUILD_PHASE_PROBE=ON EXL2BUILD_CUDA=ON EXL2BUILD_CUDA_ARCHS=90 pip install --no-build-isolation --no-deps .
    python benchmarks/gemv_phases.py [--shapes 4096x4096,8192x28672] [--bpw 4.0,2.5]

Thread 0 of every block stamps the SM clock at entry, after the grid-dependency wait, after the
prologue (x staged and the offset sums), after warp 0's unit loop and at exit, and the global timer
at entry and exit. Per shape, over single launches (the GPU otherwise idle) and over the last launch
of a chain of back-to-back launches (programmatic dependent launch, as in a decode step):
  * span: first block's entry to last block's exit (global timer), and the graph-timed time per call;
  * the blocks' entries and exits relative to the first entry (median and last);
  * each phase's duration inside a block (SM clock, in us at the clock rate the stamps imply):
    median and largest over the blocks.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  benchmarks/kernels.py: random weights, graph timing

C = kb.C

PHASES = [("wait", 2, 3), ("x + sums", 3, 4), ("unit loop", 4, 5), ("output", 5, 6), ("block", 2, 6)]


def stamps(launch, n_launch: int) -> torch.Tensor:
    """[blocks, 9] int64: the 8 stamps of each block of the last of n_launch back-to-back launches,
    then the block's linear index (blockIdx.y * gridDim.x + blockIdx.x: the K split is index // gx)."""
    B, S = C.gemv_phase_shape
    buf = torch.zeros(B, S, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    C.gemv_phase_copy(buf.data_ptr(), True, kb.stream())
    for _ in range(n_launch):
        launch()
    C.gemv_phase_copy(buf.data_ptr(), True, kb.stream())
    torch.cuda.synchronize()
    buf = buf.cpu()
    idx = torch.nonzero(buf[:, 0] != 0).flatten()
    return torch.cat([buf[idx], idx[:, None]], dim=1)


def clock_ghz(st: torch.Tensor) -> float:
    """SM cycles per ns, from all blocks together (the global timer's steps average out)."""
    return float((st[:, 6] - st[:, 2]).double().sum() / (st[:, 1] - st[:, 0]).double().sum())


def loop_us(st: torch.Tensor) -> torch.Tensor:
    """Each block's unit-loop duration (us), at the SM clock rate the stamps imply."""
    return (st[:, 5] - st[:, 4]).double() / clock_ghz(st) / 1e3


def loop_times(st: torch.Tensor) -> dict[int, float]:
    """The unit loop's duration (us) per block linear index (stamp column 8)."""
    return dict(zip(st[:, 8].tolist(), loop_us(st).tolist()))


def slow_blocks(runs: list[torch.Tensor], gx: int, top: int = 8) -> dict:
    """Whether the same blocks are the slow ones launch after launch: the correlation of the blocks'
    loop times between consecutive runs (1: the same blocks every time, 0: a different draw each
    launch), and the slowest blocks of the first run as (x, K split, SM, loop us) with their loop
    time in the other runs."""
    times = [loop_times(st) for st in runs]
    common = sorted(set.intersection(*(set(t) for t in times)))
    corr = []
    for a, b in zip(times, times[1:]):
        va, vb = torch.tensor([a[i] for i in common]), torch.tensor([b[i] for i in common])
        corr.append(float(torch.corrcoef(torch.stack([va, vb]))[0, 1]))
    sm = dict(zip(runs[0][:, 8].tolist(), runs[0][:, 7].tolist()))
    worst = sorted(common, key=lambda i: -times[0][i])[:top]
    return {"corr": corr, "slowest": [(i % gx, i // gx, sm[i], times[0][i], [t[i] for t in times[1:]]) for i in worst]}


def arrival_on_sm(st: torch.Tensor) -> torch.Tensor:
    """Each block's place in the order its SM started the launch's blocks (0: first), by the SM clock
    at entry (one clock per SM, so comparable within an SM)."""
    sm, entry = st[:, 7].long(), st[:, 2]
    order = torch.empty_like(sm)
    for s in torch.unique(sm):
        idx = torch.nonzero(sm == s).flatten()
        order[idx[torch.argsort(entry[idx])]] = torch.arange(len(idx))
    return order


def loop_spread(st: torch.Tensor, gx: int) -> dict:
    """The unit loop's median duration (us) over the blocks grouped by how many blocks of the launch
    ran on their SM, by K split (rank), and by the block's arrival on its SM: tells an uneven spread
    of blocks over the SMs from uneven work per K split, and both from an SM favouring the warps it
    started first."""
    loop = loop_us(st)
    sm = st[:, 7].long()
    on_sm = torch.bincount(sm)[sm]
    rank = st[:, 8] // gx
    out = {}
    for name, key in (("blocks on its SM", on_sm), ("K split", rank), ("arrival on its SM", arrival_on_sm(st))):
        out[name] = {int(k): (float(loop[key == k].median()), int((key == k).sum())) for k in torch.unique(key)}
    return out


def summarize(runs: list[torch.Tensor]) -> dict:
    """Medians over runs of each figure (us)."""
    figs: dict[str, list[float]] = {}

    def add(k, v):
        figs.setdefault(k, []).append(v)
    for st in runs:
        g0, g1 = st[:, 0].double(), st[:, 1].double()
        t0 = g0.min()
        ghz = clock_ghz(st)
        add("blocks", float(st.shape[0]))
        add("span", float(g1.max() - t0) / 1e3)
        add("entry med", float((g0 - t0).median()) / 1e3)
        add("entry last", float((g0 - t0).max()) / 1e3)
        add("exit med", float((g1 - t0).median()) / 1e3)
        add("GHz", ghz)
        for name, a, b in PHASES:
            d = (st[:, b] - st[:, a]).double() / ghz / 1e3
            add(f"{name} med", float(d.median()))
            add(f"{name} max", float(d.max()))
        per_sm = torch.bincount(st[:, 7].long())
        add("blocks/SM max", float(per_sm.max()))
    return {k: statistics.median(v) for k, v in figs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,4096x14336,8192x28672")
    ap.add_argument("--bpw", default="4.0,2.5")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--chain", type=int, default=8, help="launches per chain (the last one is stamped)")
    args = ap.parse_args()
    if C is None or not hasattr(C, "gemv_phase_copy"):
        sys.exit("gemv_phases.py: this exl2build was built without the phase probe; rebuild with "
                 "EXL2BUILD_PHASE_PROBE=ON EXL2BUILD_CUDA=ON (see this file's docstring)")
    print(f"card: {torch.cuda.get_device_name()}")
    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        for bpw in (float(b) for b in args.bpw.split(",")):
            qt0 = kb.random_qtensor(K, N, bpw, seed=K + N)
            n_copies = max(2, math.ceil(2 * kb.L2_BYTES / kb.weight_bytes(qt0)))
            qts = [qt0] + [kb.random_qtensor(K, N, bpw, seed=K + N + i) for i in range(1, n_copies)]
            x = (torch.randn(1, K, device="cuda") * 0.5).half()
            y = torch.empty(1, N, device="cuda", dtype=torch.float16)
            argsets = [kb.gemv_args(x, qt, y) for qt in qts]
            launch = kb.gemv(argsets, 0, 0)
            t_graph = kb.time_graph(launch, 4 * len(argsets)) * 1e6
            plan = C.gemv_plan([(qt0.q_weight.shape[1], argsets[0][10], argsets[0][11])], 1,
                               *C.device_gemv_figures(), 0, 0, 0)
            for mode, n in (("single", 1), (f"chain of {args.chain}", args.chain)):
                runs = [stamps(launch, n) for _ in range(args.runs)]
                s = summarize(runs)
                rows.append((f"{K}x{N}", bpw, mode, t_graph, s))
                print(f"{K}x{N} {bpw} bpw {mode}: graph {t_graph:.1f} us/call, " +
                      ", ".join(f"{k} {v:.2f}" for k, v in s.items()), flush=True)
                if mode == "single":  # the spread of one run (the middle one), then across the runs
                    spread = loop_spread(runs[len(runs) // 2], plan["blocks"])
                    for name, groups in spread.items():
                        print(f"  unit loop by {name}: " + ", ".join(
                            f"{k}: {med:.2f} us ({n} blocks)" for k, (med, n) in groups.items()), flush=True)
                    slow = slow_blocks(runs, plan["blocks"])
                    print("  unit loop, run-to-run correlation over the blocks: " +
                          ", ".join(f"{c:.2f}" for c in slow["corr"]) + "; slowest blocks (x, K split, SM: us, "
                          "then in the other runs): " + "; ".join(
                              f"({x}, {r}, {m}: {t:.1f}, " + "/".join(f"{o:.1f}" for o in other) + ")"
                              for x, r, m, t, other in slow["slowest"]), flush=True)
    head = ["K x N", "bpw", "launch", "graph us/call", "span us", "blocks (max/SM)", "entry med / last",
            "exit med"] + [f"{p} med / max" for p, _, _ in PHASES]
    print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for shape, bpw, mode, tg, s in rows:
        cells = [shape, f"{bpw}", mode, f"{tg:.1f}", f"{s['span']:.1f}", f"{s['blocks']:.0f} ({s['blocks/SM max']:.0f})",
                 f"{s['entry med']:.1f} / {s['entry last']:.1f}", f"{s['exit med']:.1f}"]
        cells += [f"{s[p + ' med']:.2f} / {s[p + ' max']:.2f}" for p, _, _ in PHASES]
        print("| " + " | ".join(cells) + " |")
    print(f"\n(SM clock in the stamps: {statistics.median(r[4]['GHz'] for r in rows):.2f} GHz)")


if __name__ == "__main__":
    main()
