"""The benchmark helpers that post-process device outputs (they run on this machine)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    """A benchmark script as a module. Some scripts put benchmarks/ on sys.path and import its
    kernels.py as `kernels`: both are undone here, or a later `import kernels` elsewhere in the test
    run (transformers looks for a package of that name) would find the benchmark."""
    path, modules = list(sys.path), set(sys.modules)
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path
        for m in set(sys.modules) - modules:
            if str(getattr(sys.modules[m], "__file__", "") or "").startswith(str(BENCH)):
                del sys.modules[m]
    return mod


def test_ncu_blocks_splits_at_branches_and_count_changes(tmp_path):
    # Nsight Compute's source-page export: a kernel-name line, then the header and one row per instruction.
    rows = [
        ("0x1000", "LDS R1, [R2]", 10, 1), ("0x1010", "IADD3 R1, R1, 1", 10, 2), ("0x1020", "@P0 BRA 0x1000", 10, 0),
        ("0x1030", "LOP3.LUT R3, R1, 0xf", 10, 5), ("0x1040", "HMMA.16816.F32 R4, R8, R12, R4", 40, 30),
        ("0x1050", "EXIT", 1, 0),
    ]
    lines = ['"Kernel Name","k"', '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"']
    lines += [f'"{a}","{s}","{sm}","{ex}"' for a, s, ex, sm in rows]
    path = tmp_path / "src.csv"
    path.write_text("\n".join(lines) + "\n")
    bbs = load("ncu_blocks").blocks(str(path))
    # [first, last, executions, instructions, samples, ends in a branch]
    assert [b[:5] for b in bbs] == [[0x0, 0x20, 10, 3, 3.0], [0x30, 0x30, 10, 1, 5.0], [0x40, 0x40, 40, 1, 30.0],
                                    [0x50, 0x50, 1, 1, 0.0]]


def test_gemv_phases_summarizes_the_stamps():
    """gemv_phases.summarize: span and entries from the global timer (ns), phase durations from the SM
    clock at the rate the stamps imply, blocks per SM from the SM ids."""
    import torch
    phases = load("gemv_phases")
    ghz = 2.0  # SM cycles per ns
    rows = []
    # block: global entry, global exit (ns), then phase durations (ns): wait, x + sums, loop, output; SM id
    for g0, d, sm in [(1000, (500, 300, 2000, 200), 0), (1100, (600, 300, 3000, 100), 0), (1300, (400, 500, 1000, 300), 1)]:
        clk = [5000]
        for v in d:
            clk.append(clk[-1] + int(v * ghz))
        rows.append([g0, g0 + sum(d), *clk, sm])
    s = phases.summarize([torch.tensor(rows, dtype=torch.int64)])
    assert s["GHz"] == pytest.approx(ghz)
    assert s["blocks"] == 3 and s["blocks/SM max"] == 2
    assert s["span"] == pytest.approx((1100 + 4000 - 1000) / 1e3)
    assert s["entry last"] == pytest.approx(0.3)
    assert s["wait med"] == pytest.approx(0.5) and s["wait max"] == pytest.approx(0.6)
    assert s["unit loop med"] == pytest.approx(2.0) and s["unit loop max"] == pytest.approx(3.0)
    assert s["block max"] == pytest.approx(4.0)


def test_gemv_phases_spreads_the_unit_loop_by_sm_load_and_k_split():
    """gemv_phases.loop_spread: the unit loop's median per count of blocks on the block's SM and per K
    split (the block's linear index // blocks along x)."""
    import torch
    phases = load("gemv_phases")
    rows = []
    # 4 blocks along x, 2 K splits; SM 0 runs three blocks, SM 1 one, SM 2 four (all of split 1).
    # Stamps 0-1 global timer, 2-6 SM clock (entry, wait, prologue, loop end, exit), 7 SM, 8 index;
    # the loop takes 1000 ns at split 0, 2000 at split 1, 500 more on SM 2; both clocks 1 per ns.
    for b, sm in enumerate([0, 0, 0, 1, 2, 2, 2, 2]):
        loop = 1000 * (1 + b // 4) + (500 if sm == 2 else 0)
        rows.append([0, 300 + loop, 0, 100, 200, 200 + loop, 300 + loop, sm, b])
    st = torch.tensor(rows, dtype=torch.int64)
    out = phases.loop_spread(st, gx=4)
    assert out["blocks on its SM"] == {1: (pytest.approx(1.0), 1), 3: (pytest.approx(1.0), 3), 4: (pytest.approx(2.5), 4)}
    assert out["K split"] == {0: (pytest.approx(1.0), 4), 1: (pytest.approx(2.5), 4)}


def test_gemv_phases_orders_the_blocks_by_arrival_on_their_sm():
    """gemv_phases.arrival_on_sm: a block's place among its SM's blocks by the SM clock at entry, and
    loop_spread's grouping by it."""
    import torch
    phases = load("gemv_phases")
    # (SM, entry clock, loop ns): SM 0 starts blocks 2, 0, 1 in that order; SM 1 blocks 4, 3.
    blocks = [(0, 50, 1000), (0, 90, 1200), (0, 10, 800), (1, 70, 1100), (1, 20, 900)]
    rows = [[0, 300 + loop, e, e + 100, e + 200, e + 200 + loop, e + 300 + loop, sm, b]
            for b, (sm, e, loop) in enumerate(blocks)]
    st = torch.tensor(rows, dtype=torch.int64)
    assert phases.arrival_on_sm(st).tolist() == [1, 2, 0, 1, 0]
    out = phases.loop_spread(st, gx=5)["arrival on its SM"]
    assert out == {0: (pytest.approx(0.8), 2), 1: (pytest.approx(1.0), 2), 2: (pytest.approx(1.2), 1)}


def test_gemv_phases_names_the_blocks_slow_in_every_run():
    """gemv_phases.slow_blocks: the run-to-run correlation of the blocks' loop times, and the slowest
    blocks of the first run with their times in the others."""
    import torch
    phases = load("gemv_phases")

    def run(loops):  # one block per entry: loop (ns) as given, both clocks 1 per ns, SM = index % 3
        return torch.tensor([[0, 300 + t, 0, 100, 200, 200 + t, 300 + t, b % 3, b] for b, t in enumerate(loops)],
                            dtype=torch.int64)
    same = [1000, 1100, 5000, 1200, 1050, 1150]
    out = phases.slow_blocks([run(same), run([t + 10 for t in same])], gx=3, top=2)
    assert out["corr"][0] == pytest.approx(1.0)
    # block 2 (x 2, split 0, SM 2) is the slowest, then block 3 (x 0, split 1, SM 0)
    assert [s[:4] for s in out["slowest"]] == [(2, 0, 2, pytest.approx(5.0)), (0, 1, 0, pytest.approx(1.2))]
    assert out["slowest"][0][4] == [pytest.approx(5.01)]
    shuffled = phases.slow_blocks([run(same), run([1000, 5000, 1100, 1050, 1200, 1150])], gx=3)
    assert shuffled["corr"][0] < 0.5
