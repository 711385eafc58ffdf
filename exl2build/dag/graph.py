"""Recipe -> the list of steps, in dependency order.

  source -> calib -> measure (once) -> per bpw: optimize -> quantize -> compile -> evaluate
  source -> evaltext -> evaluate[fp16] (the KLD reference) ;  everything -> report
"""

from __future__ import annotations

from typing import Optional

from exl2build.config import RecipeConfig
from exl2build.dag.step import Step
from exl2build.steps import calibrate, compile, evaltext, evaluate, measure, optimize, quantize, report, source


def build_graph(cfg: RecipeConfig, recipe_path: Optional[str] = None) -> list[Step]:
    src = source.make(cfg.source)
    steps = [src]
    # The FP16 evaluation comes before the measurement (the order steps are started in, where both
    # are ready): a bad evaluation text or setting fails in seconds, not after the measurement.
    tokens = base_eval = None
    if cfg.eval.enabled:
        tokens = evaltext.make(cfg.eval.text, src)
        base_eval = evaluate.make(cfg.eval, src, tokens)
        steps += [tokens, base_eval]
    cal = calibrate.make(cfg.calib, src)
    meas = measure.make(cfg.quant, src, cal)
    steps += [cal, meas]

    compiles, strategies, evals = {}, {}, {}
    for bpw in cfg.quant.bpws:
        opt = optimize.make(bpw, meas)
        q = quantize.make(bpw, cfg.quant, src, cal, opt)
        comp = compile.make(bpw, cfg.quant.head_bits, cfg.quant.shard_size_mb, src, cal, q)
        steps += [opt, q, comp]
        strategies[bpw], compiles[bpw] = opt, comp
        if cfg.eval.enabled:
            evals[bpw] = evaluate.make(cfg.eval, comp, tokens, reference=base_eval, bpw=bpw)
            steps.append(evals[bpw])

    recipe = {
        "name": cfg.name,
        "path": recipe_path,
        "out_dir": cfg.out_dir,
        "bpws": list(cfg.quant.bpws),
        "source": cfg.source.path or f"fetch:{cfg.source.fetch}",
        "eval": evaluate.eval_params(cfg.eval) if cfg.eval.enabled else {},
        "gates": dict(vars(cfg.eval.gates)) if cfg.eval.enabled else {},
    }
    steps.append(report.make(recipe, src, compiles, strategies, evals, base_eval))
    return steps
