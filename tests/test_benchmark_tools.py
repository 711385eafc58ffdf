"""The benchmark helpers that post-process device outputs (they run on this machine)."""

import importlib.util
from pathlib import Path

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
