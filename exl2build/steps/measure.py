"""Step `measure`: the error of every candidate option in every block (measurement.json),
computed once per model + calibration and shared by every bitrate."""

from __future__ import annotations

from exl2build.config import QuantConfig
from exl2build.dag.step import Step, StepContext
from exl2build.steps import calibrate
from exl2build.steps.common import call, load_tokens, quant_params

VERSION = 1
FILE = "measurement.json"


def make(cfg: QuantConfig, model: Step, calib: Step) -> Step:
    return Step("measure", "measure", VERSION, quant_params(cfg), run, inputs={"model": model, "calib": calib}, gpu=True)


def run(ctx: StepContext) -> None:
    from exl2build.quant.measure import measure_model, write_measurement

    tokens = load_tokens(ctx.inputs["calib"] / calibrate.MEASURE_FILE)
    m = call(measure_model, ctx.inputs["model"], tokens, ctx.params, ctx.work, ctx.progress, device=ctx.device)
    write_measurement(m, ctx.out / FILE)
