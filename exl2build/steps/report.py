"""Step `report` (never cached: it records this run's step statuses): report.md,
report.json and plots in <out_dir>, then the quality gates."""

from __future__ import annotations

from pathlib import Path

from exl2build.dag.step import Step, StepContext
from exl2build.steps import evaluate, optimize
from exl2build.steps.common import bpw_label, read_json

VERSION = 1


def make(recipe: dict, source: Step, compiles: dict, strategies: dict, evals: dict, baseline_eval: Step | None) -> Step:
    """compiles/strategies/evals: bpw -> Step (evals empty when evaluation is off)."""
    inputs = {"source": source}
    if baseline_eval is not None:
        inputs["evaluate[fp16]"] = baseline_eval
    for bpw in compiles:
        inputs[compiles[bpw].label] = compiles[bpw]
        inputs[strategies[bpw].label] = strategies[bpw]
        if bpw in evals:
            inputs[evals[bpw].label] = evals[bpw]
    return Step("report", "report", VERSION, recipe, run, inputs=inputs, cache=False, export="")


def _figures(ctx: StepContext, label: str) -> dict | None:
    path = ctx.inputs.get(label)
    return read_json(path / evaluate.FILE) if path else None


def run(ctx: StepContext) -> None:
    from exl2build.eval.report import baseline_entry, build_entry, write_report

    p = ctx.params
    base_figures = _figures(ctx, "evaluate[fp16]")
    baseline = baseline_entry(ctx.inputs["source"], base_figures)
    builds = []
    for bpw in p["bpws"]:
        name = bpw_label(bpw)
        strategy = read_json(ctx.inputs[f"optimize[{name}]"] / optimize.FILE)
        figures = _figures(ctx, f"evaluate[{name}]")
        builds.append(build_entry(bpw, Path(p["out_dir"]) / f"{name}bpw", figures, strategy.get("achieved_bpw")))
    source_manifest = read_json(ctx.inputs["source"] / "manifest.json")
    report = {
        "recipe": {"name": p["name"], "path": p.get("path")},
        "source": {"path": p["source"], "digest": source_manifest["files"]["source"]["digest"]},
        "eval": {"text": (base_figures or {}).get("text"), **p["eval"]} if base_figures else {},
        "baseline": baseline,
        "builds": builds,
        "steps": ctx.extra.get("steps", []),
    }
    write_report(ctx.out, report)
    _check_gates(p.get("gates") or {}, builds, baseline)


def _check_gates(gates: dict, builds: list[dict], baseline: dict) -> None:
    if not any(v is not None for v in gates.values()):
        return
    from exl2build.errors import StepError
    from exl2build.eval.gates import check_gates

    failures = []
    for b in builds:
        try:
            check_gates(gates, b["bpw_target"], b, baseline)
        except StepError as exc:
            failures.append(str(exc))
    if failures:
        raise StepError(" ".join(failures))
