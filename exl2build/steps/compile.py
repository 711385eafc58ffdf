"""Step `compile[bpw]`: the complete EXL2 model folder (shards, config with
quantization_config, tokenizer and other files of the source); exported to <out_dir>/<bpw>bpw."""

from __future__ import annotations

from exl2build.dag.step import Step, StepContext
from exl2build.steps import calibrate
from exl2build.steps.common import bpw_label, read_json

VERSION = 1


def make(bpw: float, head_bits: int, shard_size_mb: int, model: Step, calib: Step, quantized: Step) -> Step:
    params = {"bpw": float(bpw), "head_bits": head_bits, "shard_size_mb": shard_size_mb}
    return Step("compile", f"compile[{bpw_label(bpw)}]", VERSION, params, run,
                inputs={"model": model, "calib": calib, "quantized": quantized}, export=f"{bpw_label(bpw)}bpw")


def run(ctx: StepContext) -> None:
    import exl2build
    from exl2build.format.compile import compile_full
    from exl2build.format.exl2 import quantization_config

    p = ctx.params
    info = read_json(ctx.inputs["calib"] / calibrate.INFO_FILE)
    qc = quantization_config(exl2build.__version__, p["bpw"], p["head_bits"], info["rows"], info["length"], info["dataset"])
    compile_full(ctx.inputs["model"], ctx.inputs["quantized"], ctx.out, p["shard_size_mb"], qc)
