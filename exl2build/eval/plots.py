"""Report figures as PNG: one metric per image against bits per weight, FP16 as a line.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
headless and does not disturb a caller that uses matplotlib itself.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# file name, figure key, y label, log scale, FP16 value key (None: FP16 is 0 / not drawn)
PLOTS = (
    ("ppl_vs_bpw.png", "ppl", "perplexity (lower is better)", False, "ppl"),
    ("kld_vs_bpw.png", "kld_mean", "mean KL-divergence to FP16 (log scale)", True, None),
    ("top1_vs_bpw.png", "top1_agreement", "top-1 agreement with FP16", False, "top1_agreement"),
)


def _x(build: dict) -> float | None:
    # Plot at the achieved bitrate when known: that is what the size and quality come from.
    x = build.get("bpw_decoder")
    return x if x is not None else build.get("bpw_target")


def plot_metric(path: Path, builds: list[dict], key: str, ylabel: str, log: bool = False,
                fp16: float | None = None, title: str | None = None) -> Path | None:
    """One line plot of `key` vs bpw; None (nothing written) when no build has the figure."""
    pts = sorted((_x(b), b[key], b) for b in builds if b.get(key) is not None and _x(b) is not None)
    if log:
        pts = [p for p in pts if p[1] > 0]
    if not pts:
        return None
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax.plot(xs, ys, marker="o", color="tab:blue", label="EXL2 builds")
    for x, y, b in pts:
        ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if fp16 is not None:
        ax.axhline(fp16, color="tab:red", linestyle="--", label=f"FP16 ({fp16:.4g})")
    if log:
        ax.set_yscale("log")
    ax.margins(x=0.08, y=0.12)  # room for the value labels above the points
    ax.set_xlabel("decoder bits per weight")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel.split(' (')[0]} vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_plots(out_dir: str | Path, builds: list[dict], baseline: dict | None = None) -> list[Path]:
    """Every plot the figures allow; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, ylabel, log, fp16_key in PLOTS:
        fp16 = (baseline or {}).get(fp16_key) if fp16_key else None
        if key == "top1_agreement" and fp16 is None and baseline:
            fp16 = 1.0  # FP16 agrees with itself
        p = plot_metric(out / name, builds, key, ylabel, log, fp16)
        if p is not None:
            written.append(p)
    return written
