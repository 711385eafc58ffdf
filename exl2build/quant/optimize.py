"""The bitrate optimizer: one option per block so that the model meets a target bpw.

This is a multiple-choice knapsack: minimise sum_b loss(err_b[o_b]) subject to
sum_b bits_b[o_b] <= target * weights (and >= (target - tolerance) * weights).

loss = err^2 by default: err is the relative Frobenius error a block adds to the residual
stream, and for independent errors the injected noise energies add, so sum err^2 is (up to
the stream's norm) the total noise the model sees. A plain sum of err would over-reward
shaving already-small errors; exllamav2 sweeps the exponent between 1.5 and 3.5 for the
same reason. `loss_exponent` makes it configurable.

Method:
1. Lagrangian relaxation: for a multiplier lam each block independently picks
   argmin loss + lam * bits; bisection on lam finds the cheapest feasible pick. Its dual
   value is a lower bound on the optimum, reported as `lower_bound` (the gap certifies the
   answer).
2. Exact repair: a DP over bits discretised in the budget's slack (exact when the slack is
   at most DP_UNITS bits, otherwise costs are rounded up so the answer stays feasible),
   followed by a greedy fill that spends any bits the rounding left unused.
The better of the two (both feasible) is returned. Everything is deterministic: ties go to
fewer bits, then to the earlier option in the table.
"""

from __future__ import annotations

import math

import numpy as np

from exl2build.errors import ConfigError, StepError

DEFAULT_TOLERANCE = 0.02
DP_UNITS = 40000


def _blocks(measurement: dict):
    blocks = measurement.get("blocks")
    if not blocks:
        raise ConfigError("measurement: key 'blocks' is missing or empty; re-run the measure step.")
    out = []
    for b in blocks:
        opts = b["options"]
        out.append(
            (
                b["key"],
                [o["name"] for o in opts],
                np.array([int(o["bits"]) for o in opts], dtype=np.int64),
                np.array([float(o["err"]) for o in opts], dtype=np.float64),
            )
        )
    weights = int(sum(int(b["weights"]) for b in blocks))
    return out, weights


def _pick(losses, bits, lam):
    """Per block: argmin loss + lam * bits; ties to fewer bits, then the earlier index."""
    idx = []
    for loss, b in zip(losses, bits):
        score = loss + lam * b
        order = np.lexsort((np.arange(len(b)), b, score))
        idx.append(int(order[0]))
    return idx


def _total(bits, idx):
    return int(sum(int(b[i]) for b, i in zip(bits, idx)))


def _loss(losses, idx):
    return float(sum(float(l[i]) for l, i in zip(losses, idx)))


def _lagrangian(losses, bits, budget):
    """(feasible pick, dual lower bound) by bisection on lam."""
    spread = max(float(l.max() - l.min()) for l in losses)
    bstep = min(
        (float(np.min(np.diff(np.unique(b)))) for b in bits if len(np.unique(b)) > 1),
        default=1.0,
    )
    hi = 2.0 * (spread + 1.0) / bstep  # large enough that every block takes its fewest bits
    lo = 0.0
    best_idx = _pick(losses, bits, hi)
    dual = -math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        idx = _pick(losses, bits, mid)
        dual = max(dual, _loss(losses, idx) + mid * (_total(bits, idx) - budget))
        if _total(bits, idx) <= budget:
            hi, best_idx = mid, idx
        else:
            lo = mid
    idx0 = _pick(losses, bits, 0.0)
    if _total(bits, idx0) <= budget:  # the budget does not bind at all
        return idx0, _loss(losses, idx0)
    return best_idx, dual


def _dp(losses, bits, budget):
    """Min-loss pick with sum bits <= budget via DP over discretised extra bits."""
    base = [int(b.min()) for b in bits]
    slack = budget - sum(base)
    units = min(DP_UNITS, max(slack, 0))
    unit = slack / units if units else 1.0
    INF = np.inf
    dp = np.zeros(units + 1, dtype=np.float64)  # dp[u]: min loss so far using <= u units
    choices = []
    for loss, b, b0 in zip(losses, bits, base):
        cost = np.ceil((b - b0) / unit - 1e-9).astype(np.int64) if units else np.zeros(len(b), np.int64)
        new = np.full(units + 1, INF)
        arg = np.zeros(units + 1, dtype=np.int32)
        for j in np.lexsort((np.arange(len(b)), b)):  # fewer bits first: strict < keeps ties there
            c = int(cost[j])
            if c > units:
                continue
            cand = np.full(units + 1, INF)
            cand[c:] = dp[: units + 1 - c] + loss[j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choices.append(arg)
    if not np.isfinite(dp[units]):
        return None
    idx, u = [], units
    for loss, b, arg, b0 in zip(reversed(losses), reversed(bits), reversed(choices), reversed(base)):
        j = int(arg[u])
        idx.append(j)
        c = int(np.ceil((b[j] - b0) / unit - 1e-9)) if units else 0
        u -= c
    return idx[::-1]


def _fill(losses, bits, idx, budget, low):
    """Greedy: take the upgrade with the best loss drop per extra bit while it fits the budget;
    upgrades that do not lower the loss are taken only while the total is below `low`."""
    idx = list(idx)
    total = _total(bits, idx)
    while True:
        best = None
        for bi, (loss, b) in enumerate(zip(losses, bits)):
            cur = idx[bi]
            for j in range(len(b)):
                extra = int(b[j] - b[cur])
                if extra <= 0 or total + extra > budget:
                    continue
                gain = float(loss[cur] - loss[j])
                if gain <= 0 and total >= low:
                    continue
                key = (-gain / extra, extra, bi, j)
                if best is None or key < best[0]:
                    best = (key, bi, j, extra)
        if best is None:
            return idx
        _, bi, j, extra = best
        idx[bi] = j
        total += extra


def choose(measurement: dict, target_bpw: float, tolerance: float = DEFAULT_TOLERANCE, loss_exponent: float = 2.0) -> dict:
    """Strategy for `target_bpw` over the decoder layers' linears (see module doc)."""
    blocks, weights = _blocks(measurement)
    keys = [b[0] for b in blocks]
    names = [b[1] for b in blocks]
    bits = [b[2] for b in blocks]
    errs = [b[3] for b in blocks]
    losses = [np.power(np.maximum(e, 0.0), loss_exponent) for e in errs]

    min_bits = sum(int(b.min()) for b in bits)
    max_bits = sum(int(b.max()) for b in bits)
    budget = int(math.floor(target_bpw * weights))
    low = int(math.ceil((target_bpw - tolerance) * weights))
    if not (math.isfinite(target_bpw) and budget >= min_bits and low <= max_bits):
        raise ConfigError(
            f"target bpw {target_bpw!r} is outside the reachable range {min_bits / weights:.4f} .. "
            f"{max_bits / weights:.4f} for this model's measured options (tolerance {tolerance}). "
            "Set quant.bits (the target) inside that range."
        )
    lag_idx, lower_bound = _lagrangian(losses, bits, budget)
    candidates = [lag_idx]
    dp_idx = _dp(losses, bits, budget)
    if dp_idx is not None:
        candidates.append(dp_idx)
    candidates = [_fill(losses, bits, c, budget, low) for c in candidates]
    feasible = [c for c in candidates if low <= _total(bits, c) <= budget]
    if not feasible:
        raise StepError(
            f"optimizer: no option mix reaches {target_bpw} bpw within -{tolerance} "
            f"(closest {_total(bits, candidates[-1]) / weights:.4f}); choose a target at least "
            f"{tolerance} away from the ends of the range {min_bits / weights:.4f} .. {max_bits / weights:.4f}."
        )
    idx = min(feasible, key=lambda c: (_loss(losses, c), _total(bits, c)))
    total = _total(bits, idx)
    return {
        "target_bpw": float(target_bpw),
        "tolerance": float(tolerance),
        "achieved_bpw": total / weights,
        "total_bits": total,
        "total_weights": weights,
        "loss": f"sum err^{loss_exponent:g}",
        "predicted_loss": _loss(losses, idx),
        "lower_bound": float(lower_bound),
        "options_version": measurement.get("options_version"),
        "blocks": {k: n[i] for k, n, i in zip(keys, names, idx)},
        "details": [
            {"key": k, "option": n[i], "bits": int(b[i]), "err": float(e[i])}
            for k, n, b, e, i in zip(keys, names, bits, errs, idx)
        ],
    }
