"""The benchmark helpers that post-process device outputs (they run on this machine)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
