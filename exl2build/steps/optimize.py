"""Step `optimize[bpw]`: one option per block meeting the target bitrate (strategy.json)."""

from __future__ import annotations

from exl2build.dag.step import Step, StepContext
from exl2build.steps import measure
from exl2build.steps.common import bpw_label, write_json

VERSION = 1
FILE = "strategy.json"


def make(bpw: float, measurement: Step) -> Step:
    return Step("optimize", f"optimize[{bpw_label(bpw)}]", VERSION, {"bpw": float(bpw)}, run, inputs={"measurement": measurement})


def run(ctx: StepContext) -> None:
    from exl2build.quant.measure import read_measurement
    from exl2build.quant.optimize import choose

    strategy = choose(read_measurement(ctx.inputs["measurement"] / measure.FILE), ctx.params["bpw"])
    ctx.log.info("achieved %.4f bpw for target %s", strategy.get("achieved_bpw", float("nan")), ctx.params["bpw"])
    write_json(ctx.out / FILE, strategy)
