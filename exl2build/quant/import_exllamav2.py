"""Import of an exllamav2 `measurement.json` (written by its converter's -om flag).

Its layout: {"measurement": {"model.layers.<i>.self_attn" | ".mlp": [option, ...]}, ...}
where each option is {"accuracy": 1 - err, "total_bits": int, "<linear>": {"group_size":
{bits: g}, "bits": [...], "bits_prop": [...], "scale_bits": 4}, ...}.

An option is kept only when every linear's parameters coincide exactly with one of our
BlockOptions (same group size, widths and fractions): only then do its measured error and
bits describe what our quantizer will build. Blocks with no coinciding option make the
import fail with a clear message (re-measure with exl2build instead).

The errors kept are exllamav2's (1 - accuracy: a relative Frobenius norm per calibration row,
not our per-token RMS), hence "version": 1. Estimating our options from the nearest exllamav2
option in bpw was considered and rejected; docs/quantization.md says why.
"""

from __future__ import annotations

from pathlib import Path

from exl2build.errors import InputError
from exl2build.model.config import ModelConfig
from exl2build.quant.options import ATTN_OPTIONS, MLP_OPTIONS, OPTIONS_VERSION, LinearOption


def _linear_option(qp: dict):
    gs = qp.get("group_size")
    sizes = set(gs.values()) if isinstance(gs, dict) else {gs}
    if len(sizes) != 1 or qp.get("scale_bits", 4) != 4:
        return None  # per-width group sizes or other scale bits: no LinearOption can express it
    try:
        return LinearOption(int(sizes.pop()), tuple(int(b) for b in qp["bits"]), tuple(float(p) for p in qp["bits_prop"]))
    except Exception:
        return None


def _shapes(cfg: ModelConfig) -> dict:
    h, hd = cfg.hidden_size, cfg.head_dim
    return {
        "attn": {"q_proj": (h, cfg.num_heads * hd), "k_proj": (h, cfg.num_kv_heads * hd),
                 "v_proj": (h, cfg.num_kv_heads * hd), "o_proj": (cfg.num_heads * hd, h)},
        "mlp": {"gate_proj": (h, cfg.intermediate_size), "up_proj": (h, cfg.intermediate_size),
                "down_proj": (cfg.intermediate_size, h)},
    }


def import_measurement(data, path, model_dir=None) -> dict:
    """Our measurement dict from exllamav2's JSON `data` (read from `path`)."""
    path = Path(path)
    if not isinstance(data, dict) or not isinstance(data.get("measurement"), dict):
        raise InputError(
            f"{path}: neither an exl2build measurement (key 'format') nor an exllamav2 one (key 'measurement'). "
            "Pass the measurement.json written by the measure step."
        )
    if model_dir is None:
        raise InputError(f"{path}: importing an exllamav2 measurement needs the source model folder for the layer shapes.")
    cfg = ModelConfig.from_dir(Path(model_dir))
    shapes = _shapes(cfg)
    tables = {"attn": ATTN_OPTIONS, "mlp": MLP_OPTIONS}
    blocks = []
    for i in range(cfg.num_layers):
        for kind, sub in (("attn", "self_attn"), ("mlp", "mlp")):
            key = f"{cfg.spec.layer_key(i)}.{sub}"
            entries = data["measurement"].get(key)
            if entries is None:
                raise InputError(f"{path}: no measurement for block {key!r}; the file is for another model or incomplete.")
            ours = {tuple(sorted(o.linears.items())): o for o in tables[kind]}
            options = []
            for e in entries:
                lin = {n: _linear_option(e.get(n, {})) for n in shapes[kind]}
                match = ours.get(tuple(sorted(lin.items()))) if None not in lin.values() else None
                if match is not None:
                    options.append({"name": match.name, "bits": int(match.bits(shapes[kind])),
                                    "err": max(0.0, 1.0 - float(e["accuracy"]))})
            if not options:
                raise InputError(
                    f"{path}: block {key!r}: none of its {len(entries)} exllamav2 options coincides with an "
                    "exl2build option (the two option tables differ in group sizes and mixes), so its errors do "
                    "not describe what exl2build would build. Run exl2build's measure step instead."
                )
            weights = sum(K * N for K, N in shapes[kind].values())
            blocks.append({"key": key, "kind": kind, "layer": i, "weights": weights,
                           "shapes": {n: list(s) for n, s in shapes[kind].items()}, "options": options})
    return {"format": "exl2build.measurement", "version": 1, "options_version": OPTIONS_VERSION,
            "imported_from": str(path), "decoder_weights": sum(b["weights"] for b in blocks), "blocks": blocks}
