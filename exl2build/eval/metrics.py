"""Evaluation windows and the figures computed from per-token statistics.

Two ways to cut a token stream into model inputs (the method is part of every report):

- `windows` (exllamav2): non-overlapping windows of `ctx` tokens; every token after the
  first of a window is scored (ctx - 1 targets per window). A partial tail is dropped.
- `sliding` (llama.cpp): windows of `ctx` tokens starting every `stride` tokens; only the
  second half of each window is scored, so every scored token sees at least ctx/2 tokens of
  context. stride = ctx/2 (default) scores every token after the first ctx/2 exactly once;
  stride = ctx is llama.cpp's own chunking (half the text scored).

Per-token inputs are float tensors of NLL (-log p(target)), KLD and argmax ids; the figures
are plain floats (None where undefined) so they go straight into eval.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from exl2build.errors import ConfigError

METHODS = ("windows", "sliding")


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of stream `row` go through the model; targets [score_from, end) are scored."""

    row: int
    start: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def plan_windows(lengths: list[int], ctx: int, method: str = "windows", stride: int | None = None,
                 max_windows: int | None = None) -> list[Window]:
    """The windows of each stream (one per row of the token tensor), in order.

    `lengths` are the token counts of the streams; `max_windows` keeps the first ones.
    """
    if method not in METHODS:
        raise ConfigError(f"eval.method = {method!r} is not known. Use one of: {', '.join(METHODS)}.")
    if ctx < 2:
        raise ConfigError(f"eval.ctx = {ctx}: a window needs at least 2 tokens (one context, one target).")
    half = ctx // 2
    if method == "windows":
        step, first = ctx, 1
    else:
        step = ctx - half if stride is None else int(stride)
        if not ctx - half <= step <= ctx:
            # Below ctx/2 windows would score some tokens twice; above ctx they would skip context.
            raise ConfigError(
                f"eval.stride = {stride} with eval.ctx = {ctx}: the sliding method needs "
                f"{ctx - half} <= stride <= {ctx} (each window scores its last {ctx - half} tokens)."
            )
        first = half
    out: list[Window] = []
    for row, n in enumerate(lengths):
        start = 0
        while start + ctx <= n:
            if max_windows is not None and len(out) >= max_windows:
                return out
            out.append(Window(row, start, start + ctx, start + first))
            start += step
    return out


# ---------------------------------------------------------------- statistics


def _f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _num(v: float) -> float | None:
    # JSON has no NaN/inf; an undefined figure is null.
    v = float(v)
    return v if math.isfinite(v) else None


def mean_and_err(x) -> tuple[float, float | None]:
    """Mean and its standard error, sqrt(var / (n - 1)) with the population variance (llama.cpp's)."""
    a = _f64(x)
    if a.size == 0:
        raise ValueError("mean_and_err: no values")
    m = float(a.mean())
    if a.size < 2:
        return m, None
    var = float(np.mean((a - m) ** 2))
    return m, math.sqrt(var / (a.size - 1))


def perplexity(nll) -> dict:
    """PPL = exp(mean NLL); its error by the delta method, PPL * err(mean NLL)."""
    m, e = mean_and_err(nll)
    ppl = math.exp(m)
    return {
        "ppl": _num(ppl),
        "ppl_err": None if e is None else _num(ppl * e),
        "nll_mean": _num(m),
        "nll_err": None if e is None else _num(e),
        "tokens_scored": int(_f64(nll).size),
    }


def kld_stats(kld) -> dict:
    """Mean KLD with its error, median, p90, p99, p99.9 and max."""
    a = _f64(kld)
    m, e = mean_and_err(a)
    q50, q90, q99, q999 = np.percentile(a, [50.0, 90.0, 99.0, 99.9])
    return {
        "kld_mean": _num(m),
        "kld_err": None if e is None else _num(e),
        "kld_median": _num(q50),
        "kld_p90": _num(q90),
        "kld_p99": _num(q99),
        "kld_p999": _num(q999),
        "kld_max": _num(a.max()),
    }


def top1_agreement(argmax, ref_argmax) -> dict:
    """Fraction of tokens where the model's most likely token is the reference's."""
    a, b = torch.as_tensor(argmax).reshape(-1), torch.as_tensor(ref_argmax).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"top1_agreement: {a.numel()} argmax ids vs {b.numel()} reference ids")
    m, e = mean_and_err((a.long() == b.long()).double())
    return {"top1_agreement": _num(m), "top1_err": None if e is None else _num(e)}


def delta_p(nll, ref_nll) -> dict:
    """Change of the correct token's probability, p_q - p_ref: mean with error, and RMS."""
    dp = np.exp(-_f64(nll)) - np.exp(-_f64(ref_nll))
    m, e = mean_and_err(dp)
    return {"dp_mean": _num(m), "dp_err": None if e is None else _num(e), "dp_rms": _num(math.sqrt(float(np.mean(dp**2))))}


def ppl_ratio(nll, ref_nll) -> dict:
    """ln(PPL(Q)/PPL(ref)) = mean of the per-token NLL difference; its error from that difference
    (so the strong correlation between the two models' NLLs is accounted for)."""
    m, e = mean_and_err(_f64(nll) - _f64(ref_nll))
    return {"ln_ppl_ratio": _num(m), "ln_ppl_ratio_err": None if e is None else _num(e), "ppl_ratio": _num(math.exp(m))}


def summarize(nll, argmax=None, kld=None, ref_nll=None, ref_argmax=None) -> dict:
    """All figures that the given per-token statistics allow (the ref_* ones come from FP16)."""
    out = perplexity(nll)
    if ref_nll is not None:
        out["ppl_ref"] = _num(math.exp(float(_f64(ref_nll).mean())))
        out.update(ppl_ratio(nll, ref_nll))
        out.update(delta_p(nll, ref_nll))
    if kld is not None:
        out.update(kld_stats(kld))
    if argmax is not None and ref_argmax is not None:
        out.update(top1_agreement(argmax, ref_argmax))
    return out
