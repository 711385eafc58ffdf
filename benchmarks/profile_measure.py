"""Where measurement spends its time: a SmolLM2-135M-shaped model with random weights.

    python benchmarks/profile_measure.py [--layers 4] [--rows 16] [--length 2048] [--device cuda]

Builds the model folder in a temp dir (no download), runs quant.measure.measure_model on the
first layers under cProfile and prints the hottest functions and the time per layer.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import exl2build  # noqa: F401  (sets the OpenMP wait policy before torch starts)
import torch
from safetensors.torch import save_file

from exl2build.quant.measure import measure_model

SMOLLM2 = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


def write_model(root: Path, layers: int) -> Path:
    g = torch.Generator().manual_seed(0)
    h, i, nh, nkv, v = (SMOLLM2[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab"))
    hd = h // nh
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g).half(), "model.norm.weight": torch.ones(h).half()}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes = {"self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h), "self_attn.v_proj": (nkv * hd, h),
                  "self_attn.o_proj": (h, nh * hd), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        for name, (o, k) in shapes.items():
            t[p + name + ".weight"] = (torch.randn(o, k, generator=g) * k**-0.5).half()
        t[p + "input_layernorm.weight"] = torch.ones(h).half()
        t[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": v,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}))
    return root


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=18)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model").mkdir()
        root = write_model(Path(d) / "model", a.layers)
        tokens = torch.randint(0, SMOLLM2["vocab"], (a.rows, a.length), generator=torch.Generator().manual_seed(1))
        prof = cProfile.Profile()
        t0 = time.time()
        prof.enable()
        measure_model(root, tokens, {}, Path(d) / "work", None, device=a.device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        prof.disable()
        dt = time.time() - t0
    print(f"device {a.device}: {a.layers} layers, {a.rows} x {a.length} tokens: {dt:.1f} s, {dt / a.layers:.2f} s/layer")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
