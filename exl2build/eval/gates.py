"""Quality gates: limits a recipe sets on a build's evaluation figures (for CI).

`eval.gates` maps a gate name to a limit, either one number for every bitrate or a mapping
bitrate -> number (bitrates not listed are not checked by that gate):

    eval:
      gates:
        max_kld_mean: 0.5              # every build
        max_ppl_ratio: {4.0: 1.10, 3.0: 1.35}

A build that breaks a gate raises StepError naming the bitrate, the figure and the limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from exl2build.errors import ConfigError, StepError

# gate name -> (figure in eval.json, "max" or "min")
GATES = {
    "max_kld_mean": ("kld_mean", "max"),
    "max_kld_p99": ("kld_p99", "max"),
    "max_ppl_ratio": ("ppl_ratio", "max"),
    "max_ppl": ("ppl", "max"),
    "min_top1_agreement": ("top1_agreement", "min"),
}


def _bpw_key(k) -> float:
    try:
        return float(str(k).removesuffix("bpw"))
    except ValueError:
        raise ConfigError(f"eval.gates: bitrate key {k!r} is not a number. Write it as e.g. 4.0: 1.1.") from None


def _limit(name: str, v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where} = {v!r}: a gate limit must be a finite number.")
    return float(v)


def validate_gates(gates: Mapping | None) -> dict:
    """Normalized gates {name: float | {bpw: float}}; ConfigError naming the bad key or value."""
    out: dict = {}
    for name, v in dict(gates or {}).items():
        if name not in GATES:
            raise ConfigError(f"eval.gates.{name}: unknown gate. Known gates: {', '.join(GATES)}.")
        if v is None:
            continue
        if isinstance(v, Mapping):
            out[name] = {_bpw_key(k): _limit(name, x, f"eval.gates.{name}.{k}") for k, x in v.items()}
        else:
            out[name] = _limit(name, v, f"eval.gates.{name}")
    return out


def limit_for(limit, bpw: float) -> float | None:
    if isinstance(limit, dict):
        return next((x for k, x in limit.items() if abs(k - bpw) < 1e-6), None)
    return limit


def _figure(key: str, figures: dict, baseline: dict | None) -> float | None:
    v = figures.get(key)
    if v is None and key == "ppl_ratio" and baseline and baseline.get("ppl") and figures.get("ppl") is not None:
        v = figures["ppl"] / baseline["ppl"]
    return v


FIX = "Raise the bitrate, improve the calibration, or relax the limit in the recipe."


def _failures(gates: dict, bpw: float, figures: dict, baseline: dict | None) -> tuple[list[dict], list[str]]:
    checks, failures = [], []
    for name, limit in gates.items():
        lim = limit_for(limit, bpw)
        if lim is None:
            continue
        key, kind = GATES[name]
        v = _figure(key, figures, baseline)
        if v is None:
            failures.append(
                f"eval.gates.{name} needs the figure {key!r}, which the evaluation of {bpw} bpw did not produce "
                "(KLD and top-1 need the FP16 reference; ppl_ratio needs the FP16 perplexity)"
            )
            continue
        ok = v <= lim if kind == "max" else v >= lim
        checks.append({"gate": name, "figure": key, "value": v, "limit": lim, "ok": ok})
        if not ok:
            word = "above" if kind == "max" else "below"
            failures.append(f"{key} = {v:.6g} is {word} eval.gates.{name} = {lim:g}")
    return checks, failures


def check_gates(gates: Mapping | None, bpw: float, figures: dict, baseline: dict | None = None) -> list[dict]:
    """Check one build's figures; return the checks made, or raise StepError listing every failure."""
    checks, failures = _failures(validate_gates(gates), bpw, figures, baseline)
    if failures:
        raise StepError(f"quality gate failed for the {bpw} bpw build: " + "; ".join(failures) + ". " + FIX)
    return checks


def check_builds(gates: Mapping | None, builds: list[dict], baseline: dict | None = None) -> list[dict]:
    """Check every build (report rows with bpw_target and figures); one StepError naming each failing bitrate."""
    g = validate_gates(gates)
    checks, lines = [], []
    for b in builds:
        c, failures = _failures(g, b["bpw_target"], b, baseline)
        checks += [{"bpw": b["bpw_target"], **x} for x in c]
        if failures:
            lines.append(f"{b['bpw_target']} bpw: " + "; ".join(failures))
    if lines:
        raise StepError("quality gates failed: " + " | ".join(lines) + ". " + FIX)
    return checks
