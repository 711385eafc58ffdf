"""Quantization: the chosen option per block applied layer by layer, quantized states propagated.

Each layer sees the states produced by the already-quantized earlier layers, so GPTQ
compensates for upstream error. Inside a block the linears are quantized in dependency order
(q/k/v, then o from the quantized attention's output; gate/up, then down from the quantized
SwiGLU's output), each from a Hessian of the inputs it will really see.

Outputs (per layer, into work_dir, copied to out_dir at the end so a resumed run starts
from its own finished layers): `layer-<i>.safetensors` with the QTensors and fp16 norms,
`embed.safetensors` (fp16 embeddings) and `head.safetensors` (final norm, lm_head).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from exl2build.errors import ConfigError, InputError
from exl2build.model.config import ModelConfig
from exl2build.model.linear import FP16Linear
from exl2build.model.load import load_embedding, load_final_norm, load_head, load_layer
from exl2build.model.weights import WeightStore
from exl2build.quant import layerwise as lw
from exl2build.quant.gptq import quantize_linear
from exl2build.quant.hessian import HessianAccumulator, prepare
from exl2build.quant.measure import BLOCKS, block_fn, make_rotary, quant_params
from exl2build.quant.options import OPTIONS_VERSION, block_option, head_option

# Per block kind: stages of (linears quantized together, the linear whose input is their Hessian).
STAGES = {
    "attn": ((("q_proj", "k_proj", "v_proj"), "q_proj"), (("o_proj",), "o_proj")),
    "mlp": ((("gate_proj", "up_proj"), "gate_proj"), (("down_proj",), "down_proj")),
}


def _save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}, str(tmp),
              metadata={"format": "pt"})
    tmp.replace(path)


def quantize_block(layer, kind: str, x: torch.Tensor, option, params: dict, layer_key: str):
    """Quantize one block in place (its linears become FP16Linear of the loader's weights).

    Returns (block output on x, {full linear key: QTensor}, {full linear key: bits}).
    """
    sub_name, _, _, _ = BLOCKS[kind]
    sub = getattr(layer, sub_name)
    br, damp, ss = params["batch_rows"], params["damp"], params["scale_search"]
    qts, bits = {}, {}
    for names, owner in STAGES[kind]:
        src = getattr(sub, owner)
        acc = HessianAccumulator(src.K, f"{layer_key}.{sub_name}.{owner}", x.device)
        lw.accumulate_inputs(block_fn(layer, kind), src, x, br, acc)  # runs the block only up to `src`
        prep = prepare(acc.result(), damp, f"{layer_key}.{sub_name}.{owner}")
        del acc  # H is no longer needed once prepared (K x K f32 each)
        for n in names:
            lin = getattr(sub, n)
            lopt = option.linears[n]
            key = f"{layer_key}.{sub_name}.{n}"
            qt, deq = quantize_linear(lin.weight.data, None, lopt, ss, damp=damp, bias=lin.bias, name=key, prepared=prep)
            qts[key] = qt
            bits[key] = lopt.bits(lin.K, lin.N)
            setattr(sub, n, FP16Linear(deq, lin.bias))
    y = lw.run_batched(block_fn(layer, kind), x, br)
    lw.check_finite(y, f"{layer_key}.{sub_name}")
    return y, qts, bits


def _layer_options(strategy: dict, key: str):
    try:
        return {kind: block_option(kind, strategy["blocks"][f"{key}.{BLOCKS[kind][0]}"]) for kind in BLOCKS}
    except KeyError as e:
        raise ConfigError(
            f"strategy: no option chosen for block {e.args[0]!r}. The strategy was made for another model; "
            "re-run the optimize step on this model's measurement."
        ) from None


def quantize_model(model_dir, calib_tokens: torch.Tensor, strategy: dict, head_bits: int, out_dir, work_dir,
                   progress=None, params: dict | None = None, device="cpu") -> dict:
    """Quantize the FP16 model in `model_dir` per `strategy`; returns {"linears": {key: {bits, bpw}}, ...}."""
    model_dir, out_dir, work_dir = Path(model_dir), Path(out_dir), Path(work_dir)
    device = torch.device(device)
    params = quant_params(params)
    cfg = ModelConfig.from_dir(model_dir)
    if cfg.quantization_config is not None:
        raise InputError(f"{model_dir}/config.json has a quantization_config: quantize the FP16 source model instead.")
    if strategy.get("options_version") not in (None, OPTIONS_VERSION):
        raise ConfigError(
            f"strategy uses option tables version {strategy.get('options_version')}, this build has "
            f"{OPTIONS_VERSION}. Re-run measure and optimize."
        )
    hopt = None if int(head_bits) == 16 else head_option(head_bits)
    calib_tokens = calib_tokens.to(torch.int64)
    extra = {"step": "quantize", "params": params, "blocks": strategy["blocks"], "head_bits": int(head_bits),
             "options": OPTIONS_VERSION}
    ckpt = lw.Checkpoint(work_dir, "quantize", lw.fingerprint(model_dir, calib_tokens, extra))
    tdir = work_dir / "tensors"
    tdir.mkdir(parents=True, exist_ok=True)
    spec = cfg.spec
    total = 2 * cfg.num_layers + 1  # progress counts blocks, then the head
    store = WeightStore(model_dir)
    try:
        embedding = load_embedding(store, cfg, device)
        resumed = ckpt.load(device)
        if resumed is not None:
            start, tensors, results = resumed
            x = tensors["states"]
        else:
            start, results = 0, {}
            _save({f"{spec.embed_key}.weight": embedding.weight.data}, tdir / "embed.safetensors")
            x = lw.embed_states(embedding, calib_tokens, device, params["batch_rows"])
            lw.check_finite(x, spec.embed_key)
        rotary = make_rotary(cfg, device, params)
        with torch.no_grad():  # not inference_mode: kernels.dequant reads tensor version counters
            for i in range(start, cfg.num_layers):
                key = spec.layer_key(i)
                opts = _layer_options(strategy, key)
                layer = load_layer(store, cfg, i, device, rotary)
                out = {
                    f"{key}.{n}.weight": getattr(layer, n).weight.data for n in spec.norms
                }
                for kind in ("attn", "mlp"):
                    x, qts, bits = quantize_block(layer, kind, x, opts[kind], params, key)
                    for lk, qt in qts.items():
                        out.update(qt.tensors(lk))
                        results[lk] = {"bits": int(bits[lk]), "bpw": bits[lk] / (qt.K * qt.N), "K": qt.K,
                                       "N": qt.N, "option": opts[kind].name}
                    if progress:
                        progress(2 * i + (1 if kind == "attn" else 2), total, f"quantized {key}.{BLOCKS[kind][0]}")
                _save(out, tdir / f"layer-{i:04d}.safetensors")
                del layer
                ckpt.save(i + 1, {"states": x}, results)
            if start <= cfg.num_layers:
                results.update(_quantize_head(store, cfg, x, hopt, params, embedding, tdir, device))
                ckpt.save(cfg.num_layers + 1, {"states": x[:0]}, results)
                if progress:
                    progress(total, total, "quantized lm_head")
    finally:
        store.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(tdir.glob("*.safetensors")):
        shutil.copyfile(f, out_dir / f.name)
    dec = {k: v for k, v in results.items() if k != spec.head_key}
    dec_bits = sum(v["bits"] for v in dec.values())
    dec_weights = sum(v["K"] * v["N"] for v in dec.values())
    return {
        "linears": results,
        "decoder_bpw": dec_bits / dec_weights if dec_weights else 0.0,
        "head_bits": int(head_bits),
        "files": sorted(f.name for f in tdir.glob("*.safetensors")),
    }


def _quantize_head(store, cfg, x, hopt, params, embedding, tdir, device) -> dict:
    """Final norm (fp16) and lm_head at head_bits (fp16 when head_bits is 16)."""
    spec = cfg.spec
    norm = load_final_norm(store, cfg, device)
    head = load_head(store, cfg, device, embedding=embedding)
    out = {f"{spec.norm_key}.weight": norm.weight.data}
    results = {}
    if hopt is None:
        if not cfg.tie_word_embeddings:
            out[f"{spec.head_key}.weight"] = head.weight.data
    else:
        acc = HessianAccumulator(head.K, spec.head_key, device)
        for i in range(0, x.shape[0], params["batch_rows"]):
            acc.add(norm(x[i : i + params["batch_rows"]]))
        qt, _ = quantize_linear(head.weight.data, acc.result(), hopt, params["scale_search"], damp=params["damp"],
                                bias=head.bias, name=spec.head_key)
        out.update(qt.tensors(spec.head_key))
        bits = hopt.bits(head.K, head.N)
        results[spec.head_key] = {"bits": int(bits), "bpw": bits / (head.K * head.N), "K": head.K, "N": head.N,
                                  "option": hopt.name}
    _save(out, tdir / "head.safetensors")
    return results
