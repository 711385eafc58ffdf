"""Step `quantize[bpw]`: layer-by-layer GPTQ with quantized states propagated, lm_head at
head_bits; resumable per layer through ctx.work."""

from __future__ import annotations

from exl2build.config import QuantConfig
from exl2build.dag.step import Step, StepContext
from exl2build.steps import calibrate, optimize
from exl2build.steps.common import bpw_label, call, load_tokens, quant_params, read_json, write_json

VERSION = 1
SUMMARY_FILE = "quantize.json"


def make(bpw: float, cfg: QuantConfig, model: Step, calib: Step, strategy: Step) -> Step:
    params = {"bpw": float(bpw), "head_bits": cfg.head_bits, "quant": quant_params(cfg)}
    return Step("quantize", f"quantize[{bpw_label(bpw)}]", VERSION, params, run,
                inputs={"model": model, "calib": calib, "strategy": strategy}, gpu=True)


def run(ctx: StepContext) -> None:
    from exl2build.quant.quantize import quantize_model

    tokens = load_tokens(ctx.inputs["calib"] / calibrate.QUANT_FILE)
    strategy = read_json(ctx.inputs["strategy"] / optimize.FILE)
    summary = call(quantize_model, ctx.inputs["model"], tokens, strategy, ctx.params["head_bits"], ctx.out, ctx.work, ctx.progress,
         ctx.params["quant"], device=ctx.device)
    if isinstance(summary, dict):
        write_json(ctx.out / SUMMARY_FILE, summary)
