"""The bitrate optimizer against brute force, and its range/tolerance handling."""

import itertools
import math

import numpy as np
import pytest

from exl2build.errors import ConfigError
from exl2build.quant import optimize
from exl2build.quant.optimize import choose


def _instance(blocks, options, seed, weights=1000):
    """Random convex-ish error curves: more bits -> lower error, with noise and dominated options."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(blocks):
        bits = np.sort(rng.integers(2000, 8000, size=options))
        err = np.exp(-bits / 1500.0) * rng.uniform(0.5, 2.0) * rng.uniform(0.8, 1.25, size=options)
        out.append({
            "key": f"model.layers.{b // 2}.{'self_attn' if b % 2 == 0 else 'mlp'}",
            "weights": weights,
            "options": [{"name": f"o{j}", "bits": int(bits[j]), "err": float(err[j])} for j in range(options)],
        })
    return {"blocks": out, "options_version": 1}


def _brute(m, target, tol, p=2.0):
    W = sum(b["weights"] for b in m["blocks"])
    budget, low = math.floor(target * W), math.ceil((target - tol) * W)
    best = None
    for combo in itertools.product(*[b["options"] for b in m["blocks"]]):
        bits = sum(o["bits"] for o in combo)
        if low <= bits <= budget:
            loss = sum(o["err"] ** p for o in combo)
            if best is None or loss < best:
                best = loss
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    m = _instance(blocks=4, options=5, seed=seed)
    W = 4000
    lo = sum(min(o["bits"] for o in b["options"]) for b in m["blocks"]) / W
    hi = sum(max(o["bits"] for o in b["options"]) for b in m["blocks"]) / W
    for frac in (0.2, 0.5, 0.8):
        target = lo + frac * (hi - lo)
        tol = 0.5  # wide enough that brute force has feasible mixes
        best = _brute(m, target, tol)
        if best is None:
            continue
        s = choose(m, target, tolerance=tol)
        assert s["predicted_loss"] == pytest.approx(best, rel=1e-12)
        assert target - tol <= s["achieved_bpw"] <= target
        assert s["lower_bound"] <= s["predicted_loss"] + 1e-12
        assert s["total_bits"] == sum(d["bits"] for d in s["details"])


def test_large_instance_feasible_and_near_bound():
    m = _instance(blocks=60, options=40, seed=7, weights=1_000_000)
    W = 60_000_000
    lo = sum(min(o["bits"] for o in b["options"]) for b in m["blocks"]) / W
    hi = sum(max(o["bits"] for o in b["options"]) for b in m["blocks"]) / W
    # bits here are tiny against the weights: rescale so targets are ~2..8 bpw
    for b in m["blocks"]:
        for o in b["options"]:
            o["bits"] *= 1000
    target = 1000 * (lo + 0.4 * (hi - lo))
    s = choose(m, target, tolerance=0.02)
    assert target - 0.02 <= s["achieved_bpw"] <= target
    # the Lagrangian dual bounds the optimum from below; the repaired answer sits close to it
    assert s["lower_bound"] <= s["predicted_loss"] <= 1.02 * s["lower_bound"]
    assert choose(m, target, tolerance=0.02) == s  # deterministic


def test_dp_is_exact_when_slack_is_small(monkeypatch):
    monkeypatch.setattr(optimize, "DP_UNITS", 10**9)
    m = _instance(blocks=5, options=4, seed=3)
    target = sum(sorted(o["bits"] for o in b["options"])[1] for b in m["blocks"]) / 5000 + 0.3
    s = choose(m, target, tolerance=1.0)
    assert s["predicted_loss"] == pytest.approx(_brute(m, target, 1.0), rel=1e-12)


def test_out_of_range_targets_raise_with_the_range():
    m = _instance(blocks=3, options=4, seed=1)
    with pytest.raises(ConfigError, match=r"reachable range \d+\.\d+ \.\. \d+\.\d+"):
        choose(m, 0.5)
    with pytest.raises(ConfigError, match="reachable range"):
        choose(m, 100.0)


def test_budget_not_binding_takes_best_options():
    m = _instance(blocks=3, options=4, seed=2)
    hi = sum(max(o["bits"] for o in b["options"]) for b in m["blocks"]) / 3000
    s = choose(m, hi, tolerance=0.02)
    best = sum(min(o["err"] for o in b["options"]) ** 2 for b in m["blocks"])
    assert s["predicted_loss"] == pytest.approx(best)
