"""Basic blocks of a kernel from Nsight Compute's per-instruction export, with their share of the
executed instructions and of the warp-stall samples.

Input: the CSV that `NCU_SOURCE='KxN ...' bash benchmarks/device_kernels.sh` writes
(`ncu --page source --csv --print-source sass`). A block is a run of instructions with the same
execution count, cut after each branch. Offsets are from the kernel's first instruction, so they match
`cuobjdump -sass` of the same build.

Usage: python benchmarks/ncu_blocks.py ncu_source_8192x28672.csv [--min-share 0.004]
"""

import argparse
import csv


def blocks(path: str):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    hdr, data = rows[head], rows[head + 1:]
    ia, isrc = hdr.index("Address"), hdr.index("Source")
    iex, ism = hdr.index("Instructions Executed"), hdr.index("Warp Stall Sampling (All Samples)")
    base = int(data[0][ia], 16)
    out, cur = [], None  # [first offset, last offset, executions, instructions, samples, ends in a branch]
    for r in data:
        off, ex, sm = int(r[ia], 16) - base, float(r[iex] or 0), float(r[ism] or 0)
        if cur and cur[2] == ex and not cur[5]:
            cur[1], cur[3], cur[4] = off, cur[3] + 1, cur[4] + sm
        else:
            if cur:
                out.append(cur)
            cur = [off, off, ex, 1, sm, False]
        cur[5] = "BRA" in r[isrc] or "EXIT" in r[isrc]
    out.append(cur)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--min-share", type=float, default=0.004, help="list blocks above this share of either total")
    args = ap.parse_args()
    bbs = blocks(args.csv)
    total_ex = sum(b[2] * b[3] for b in bbs)
    total_s = sum(b[4] for b in bbs) or 1.0
    print(f"{args.csv}: {total_ex:.0f} warp instructions executed, {total_s:.0f} stall samples")
    print("offsets         instrs  executions  % of instructions  % of samples")
    for first, last, ex, n, sm, _ in bbs:
        if ex * n / total_ex > args.min_share or sm / total_s > args.min_share:
            print(f"{first:6x}-{last:6x}  {n:6d}  {ex:10.0f}  {100 * ex * n / total_ex:17.1f}  {100 * sm / total_s:12.1f}")


if __name__ == "__main__":
    main()
