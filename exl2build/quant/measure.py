"""Measurement: the error every candidate option causes in every block.

Layer by layer on FP16 states: for the attention block and the MLP block, build the
Hessians from the block's FP16 inputs, quantize the block's linears with every BlockOption,
run the block with those weights and score the relative Frobenius error of its output
(after the residual add) against FP16. FP16 states are propagated, so each block is
measured in isolation and the optimizer may treat blocks as independent.

The result (also written as measurement.json by the step) is plain JSON; see
`docs/quantization.md` for its layout.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from exl2build.errors import InputError
from exl2build.model.config import ModelConfig
from exl2build.model.linear import FP16Linear
from exl2build.model.load import load_embedding, load_layer
from exl2build.model.forward import RotaryEmbedding, apply_rope, causal_attention, swiglu
from exl2build.model.weights import WeightStore
from exl2build.quant import layerwise as lw
from exl2build.quant.gptq import as_scale_search, quantize_linear
from exl2build.quant.hessian import DEFAULT_DAMP, HessianAccumulator, prepare
from exl2build.quant.options import ATTN_OPTIONS, MLP_OPTIONS, OPTIONS_VERSION

MEASUREMENT_FORMAT = "exl2build.measurement"
MEASUREMENT_VERSION = 2  # 2: per-token RMS relative error (layerwise.rel_error)

# block kind -> (submodule, linears, {linear: linear whose input Hessian it uses}, option table)
BLOCKS = {
    "attn": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
             {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj"}, ATTN_OPTIONS),
    "mlp": ("mlp", ("gate_proj", "up_proj", "down_proj"),
            {"gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}, MLP_OPTIONS),
}


def quant_params(params: dict | None) -> dict:
    """Normalised quantizer parameters (defaults filled in), JSON-able."""
    p = dict(params or {})
    known = ("damp", "scale_search", "batch_rows", "rope_scale", "rope_alpha")
    if set(p) - set(known):  # a misspelt key would otherwise quietly run the defaults
        raise ValueError(f"quantizer parameters {sorted(set(p) - set(known))} unknown; known: {', '.join(known)}")
    out = {
        "damp": float(p.get("damp", DEFAULT_DAMP)),
        "scale_search": as_scale_search(p.get("scale_search"))._asdict(),
        "batch_rows": int(p.get("batch_rows", lw.DEFAULT_BATCH_ROWS)),
    }
    for key in ("rope_scale", "rope_alpha"):  # RoPE overrides the model will be run with
        if p.get(key) is not None:
            out[key] = float(p[key])
    return out


def make_rotary(cfg, device, params: dict) -> RotaryEmbedding:
    return RotaryEmbedding(cfg, device, scale=params.get("rope_scale", 1.0), alpha=params.get("rope_alpha", 1.0))


def block_fn(layer, kind: str):
    return layer.attn_block if kind == "attn" else layer.mlp_block


def block_hessians(layer, kind: str, x: torch.Tensor, batch_rows: int, layer_key: str):
    """Run the FP16 block over x while accumulating the Hessians of its distinct inputs.

    Returns (FP16 block output, {hessian owner linear: H}).
    """
    sub_name, _, shares, _ = BLOCKS[kind]
    sub = getattr(layer, sub_name)
    owners = sorted(set(shares.values()))
    accs = {o: HessianAccumulator(getattr(sub, o).K, f"{layer_key}.{sub_name}.{o}", x.device) for o in owners}
    with contextlib.ExitStack() as stack:
        for o in owners:
            stack.enter_context(lw.observing(getattr(sub, o), accs[o]))
        y = lw.run_batched(block_fn(layer, kind), x, batch_rows)
    lw.check_finite(y, f"{layer_key}.{sub_name}")
    return y, {o: a.result() for o, a in accs.items()}


# block kind -> the linears that come first in the block: options with the same LinearOption
# for all of them (uNN and sNN) share the block's computation up to the other linears.
PREFIX = {"attn": ("q_proj", "k_proj"), "mlp": ("gate_proj", "up_proj")}


def option_groups(kind: str, table) -> list[list[int]]:
    """Indices of `table` in order, in runs of consecutive options sharing the PREFIX linears' options."""
    groups: list[list[int]] = []
    prev = None
    for k, opt in enumerate(table):
        key = tuple(opt.linears[n] for n in PREFIX[kind])
        if groups and key == prev:
            groups[-1].append(k)
        else:
            groups.append([k])
        prev = key
    return groups


def _block_prefix(layer, kind: str, x: torch.Tensor, lins: dict):
    """The part of the block (on input rows x) that depends only on the PREFIX linears.

    The same operations as DecoderLayer.attn_block / mlp_block (no KV cache, position 0), so
    prefix + _block_rest is bit for bit the block (tests/test_quant_measure_memory.py)."""
    if kind == "mlp":
        z = layer.post_attention_layernorm(x)
        return swiglu(lins["gate_proj"](z), lins["up_proj"](z))
    a = layer.self_attn
    z = layer.input_layernorm(x)
    B, T, _ = z.shape
    q = lins["q_proj"](z).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)
    k = lins["k_proj"](z).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = a.rotary.cos_sin(0, T, z.dtype)
    return z, apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _block_rest(layer, kind: str, x: torch.Tensor, prefix, lins: dict) -> torch.Tensor:
    if kind == "mlp":
        return x + lins["down_proj"](prefix)
    a = layer.self_attn
    z, q, k = prefix
    B, T, _ = z.shape
    v = lins["v_proj"](z).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
    o = causal_attention(q, k, v, a.window)
    return x + lins["o_proj"](o.transpose(1, 2).reshape(B, T, a.num_heads * a.head_dim))


def score_options(layer, kind: str, x: torch.Tensor, y_ref: torch.Tensor, batch_rows: int, lins_list) -> list[float]:
    """layerwise.rel_error of the block run with each {linear: Linear} of `lins_list` (which
    share the PREFIX linears): per row batch the shared part is computed once."""
    totals, count = [0.0] * len(lins_list), 0
    for i in range(0, x.shape[0], batch_rows):
        xb = x[i : i + batch_rows]
        r, den = lw.ref_terms(y_ref[i : i + batch_rows])
        prefix = _block_prefix(layer, kind, xb, lins_list[0])
        for j, lins in enumerate(lins_list):
            s, n = lw.error_terms(_block_rest(layer, kind, xb, prefix, lins), r, den)
            totals[j] += s
        count += n
        del prefix
    return [(t / count) ** 0.5 if count else 0.0 for t in totals]


def measure_block(layer, kind: str, x: torch.Tensor, params: dict, layer_key: str, progress=None):
    """(FP16 output, block record) for one block of one layer."""
    sub_name, linears, shares, table = BLOCKS[kind]
    sub = getattr(layer, sub_name)
    br = params["batch_rows"]
    y_ref, hess = block_hessians(layer, kind, x, br, layer_key)
    for n in linears:  # the FP16 originals do not run again: drop their fp32 copies (CPU)
        release = getattr(getattr(sub, n), "release_cache", None)
        if release is not None:
            release()
    prepared = {}
    for o in sorted(hess):  # the prepared factor replaces H (same size): keep one of them at a time
        prepared[o] = prepare(hess.pop(o), params["damp"], f"{layer_key}.{sub_name}.{o}")
    shapes = {n: (getattr(sub, n).K, getattr(sub, n).N) for n in linears}
    # (linear, LinearOption) -> FP16Linear: options share levels, so each is quantized once and
    # kept only until the last option that uses it (the tables interleave uNN/sNN, so a few
    # levels per linear are alive at a time instead of all 21).
    memo: dict = {}
    last_use = {(n, opt.linears[n]): k for k, opt in enumerate(table) for n in linears}

    def quantized(n, lopt):
        key = (n, lopt)
        if key not in memo:
            src = getattr(sub, n)
            _, deq = quantize_linear(
                src.weight.data, None, lopt, params["scale_search"], damp=params["damp"],
                bias=src.bias, name=f"{layer_key}.{sub_name}.{n}", prepared=prepared[shares[n]],
            )
            memo[key] = FP16Linear(deq, src.bias)
        return memo[key]

    options = []
    for group in option_groups(kind, table):
        errs = score_options(layer, kind, x, y_ref, br,
                             [{n: quantized(n, table[k].linears[n]) for n in linears} for k in group])
        for k, err in zip(group, errs):
            opt = table[k]
            for n in linears:
                if last_use[(n, opt.linears[n])] == k:
                    del memo[(n, opt.linears[n])]
            bits = opt.bits(shapes)
            weights = sum(K * N for K, N in shapes.values())
            options.append({"name": opt.name, "bits": int(bits), "bpw": bits / weights, "err": err})
            if progress:
                progress(k + 1, len(table), f"{layer_key}.{sub_name}")
    record = {
        "key": f"{layer_key}.{sub_name}",
        "kind": kind,
        "weights": int(sum(K * N for K, N in shapes.values())),
        "shapes": {n: [int(K), int(N)] for n, (K, N) in shapes.items()},
        "options": options,
    }
    return y_ref, record


def measure_model(model_dir, calib_tokens: torch.Tensor, params: dict | None, work_dir, progress=None, device="cpu") -> dict:
    """Measure every block of the FP16 model in `model_dir` (see module doc). Resumable via work_dir."""
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    device = torch.device(device)
    params = quant_params(params)
    cfg = ModelConfig.from_dir(model_dir)
    if cfg.quantization_config is not None:
        raise InputError(
            f"{model_dir}/config.json has a quantization_config: measurement needs the FP16 source model, "
            "not an already quantized one. Point the recipe's model at the FP16 folder."
        )
    calib_tokens = calib_tokens.to(torch.int64)
    fp = lw.fingerprint(model_dir, calib_tokens, {"step": "measure", "params": params, "options": OPTIONS_VERSION,
                                                  "version": MEASUREMENT_VERSION})
    ckpt = lw.Checkpoint(work_dir, "measure", fp)
    store = WeightStore(model_dir)
    total = cfg.num_layers
    per_layer = len(ATTN_OPTIONS) + len(MLP_OPTIONS)
    units = total * per_layer  # progress counts measured options
    try:
        resumed = ckpt.load(device)
        if resumed is not None:
            start, tensors, blocks = resumed
            x = tensors["states"]
        else:
            start, blocks = 0, []
            x = lw.embed_states(load_embedding(store, cfg, device), calib_tokens, device, params["batch_rows"])
            lw.check_finite(x, f"{cfg.spec.embed_key}")
        rotary = make_rotary(cfg, device, params)
        with torch.no_grad():  # not inference_mode: kernels.dequant reads tensor version counters
            for i in range(start, total):
                layer = load_layer(store, cfg, i, device, rotary)
                key = cfg.spec.layer_key(i)
                for kind in ("attn", "mlp"):
                    offset = i * per_layer + (0 if kind == "attn" else len(ATTN_OPTIONS))

                    def sub_progress(done, n, what, _offset=offset):
                        if progress:
                            progress(_offset + done, units, f"measure {what}")

                    x, rec = measure_block(layer, kind, x, params, key, sub_progress)
                    rec["layer"] = i
                    blocks.append(rec)
                del layer
                ckpt.save(i + 1, {"states": x}, blocks)
    finally:
        store.close()
    return {
        "format": MEASUREMENT_FORMAT,
        "version": MEASUREMENT_VERSION,
        "options_version": OPTIONS_VERSION,
        "model": {"arch": cfg.arch, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                  "intermediate_size": cfg.intermediate_size},
        "calibration": {"rows": int(calib_tokens.shape[0]), "length": int(calib_tokens.shape[1])},
        "params": params,
        "decoder_weights": int(sum(b["weights"] for b in blocks)),
        "blocks": blocks,
    }


def write_measurement(measurement: dict, path) -> None:
    Path(path).write_text(json.dumps(measurement, indent=1, sort_keys=True) + "\n")


def read_measurement(path, model_dir=None) -> dict:
    """Read our measurement.json, or import an exllamav2 one (needs `model_dir` for the shapes)."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: measurement file does not exist. Run the measure step or fix the path.") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable measurement JSON ({e}). Re-run the measure step.") from None
    if isinstance(m, dict) and m.get("format") == MEASUREMENT_FORMAT:
        if m.get("options_version") != OPTIONS_VERSION:
            raise InputError(
                f"{path}: measured with option tables version {m.get('options_version')}, this build has "
                f"version {OPTIONS_VERSION}. Re-run the measure step."
            )
        return m
    from exl2build.quant.import_exllamav2 import import_measurement

    return import_measurement(m, path, model_dir)
