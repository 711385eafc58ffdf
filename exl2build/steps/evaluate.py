"""Step `evaluate[fp16]` / `evaluate[bpw]`: perplexity, KLD against the FP16 reference,
top-1 agreement and speed on the held-out tokens (eval.json)."""

from __future__ import annotations

from exl2build.config import EvalConfig
from exl2build.dag.step import Step, StepContext
from exl2build.steps import evaltext
from exl2build.steps.common import bpw_label, call, load_tokens, read_json

VERSION = 1
FILE = "eval.json"


def eval_params(cfg: EvalConfig) -> dict:
    return {"method": cfg.method, "ctx": cfg.ctx, "stride": cfg.stride, "windows": cfg.windows, "bos": cfg.bos,
            "top_k": cfg.kld_topk, "speed": {} if cfg.speed else None}


def make(cfg: EvalConfig, model: Step, tokens: Step, reference: Step | None = None, bpw: float | None = None) -> Step:
    inputs = {"model": model, "tokens": tokens}
    if reference is not None:
        inputs["reference"] = reference
    label = "evaluate[fp16]" if bpw is None else f"evaluate[{bpw_label(bpw)}]"
    return Step("evaluate", label, VERSION, eval_params(cfg), run, inputs=inputs, gpu=True)


def run(ctx: StepContext) -> None:
    from exl2build.eval.evaluate import evaluate_model

    tokens = load_tokens(ctx.inputs["tokens"] / evaltext.TOKENS_FILE)
    info = read_json(ctx.inputs["tokens"] / evaltext.INFO_FILE)
    call(evaluate_model, ctx.inputs["model"], tokens, ctx.params, ref_dir=ctx.inputs.get("reference"), out_dir=ctx.out,
         progress=ctx.progress, device=ctx.device, text_info={"description": info["name"], **info})
