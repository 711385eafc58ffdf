"""Evaluation throughput on the GPU: an EXL2 model with and without the fp16 weight cache of
evaluate_model (DEQUANT_CACHE_SHARE), and its FP16 source, on the same random token ids.

The model has SmolLM2-135M's shapes (30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV
heads, vocab 49152) and random weights: 4-bit codes in groups of 32 with random scales and
act-order permutations (the values do not change the speed). The cached and uncached runs must
give the same perplexity (checked).

Usage (GPU machine): python benchmarks/eval_throughput.py [--windows 40] [--ctx 2048] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from exl2build import kernels_ref
from exl2build.eval import evaluate as ev
from exl2build.format.exl2 import build_qtensor

DIMS = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, layers=30)
LINEARS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "kv"), "self_attn.v_proj": ("h", "kv"),
           "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("h", "i"), "mlp.up_proj": ("h", "i"),
           "mlp.down_proj": ("i", "h")}


def make_models(root: Path) -> tuple[Path, Path]:
    """FP16 and EXL2 folders with the same non-linear weights."""
    g = torch.Generator().manual_seed(0)
    h, inter, nh, nkv, vocab, L = (DIMS[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab", "layers"))
    size = {"h": h, "i": inter, "kv": nkv * (h // nh)}
    base = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g).half(),
            "model.norm.weight": torch.ones(h, dtype=torch.float16),
            "lm_head.weight": (torch.randn(vocab, h, generator=g) * h**-0.5).half()}
    fp16, quant = dict(base), dict(base)
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            fp16[p + n + ".weight"] = quant[p + n + ".weight"] = torch.ones(h, dtype=torch.float16)
        for name, (kin, kout) in LINEARS.items():
            K, N = size[kin], size[kout]
            groups = []
            for _ in range(K // 32):
                codes = torch.randint(0, 16, (32, N), generator=g).to(torch.uint8)
                qs = torch.randint(1, 17, (N,), generator=g).to(torch.uint8)
                groups.append((4, codes, qs, float(torch.tensor(0.004).half())))
            invperm = torch.argsort(torch.randperm(K, generator=g)).to(torch.int32)
            qt = build_qtensor(groups, invperm, N)
            quant.update(qt.tensors(p + name))
            fp16[p + name + ".weight"] = kernels_ref.dequant(qt, torch.float16).T.contiguous()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": vocab,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float16"}
    dirs = []
    for name, tensors, qcfg in (("fp16", fp16, None),
                                ("exl2", quant, {"quant_method": "exl2", "version": "bench", "bits": 4.0, "head_bits": 16})):
        d = root / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **({"quantization_config": qcfg} if qcfg else {})}))
        dirs.append(d)
    return dirs[0], dirs[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tokens = torch.randint(0, DIMS["vocab"], (a.windows * a.ctx,), generator=torch.Generator().manual_seed(1))
    p = {"ctx": a.ctx}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        fp16, exl2 = make_models(Path(tmp))
        print(f"models written in {time.time() - t0:.0f} s", flush=True)
        ev.evaluate_model(exl2, tokens[: 2 * a.ctx], p, device="cuda")  # warm-up (CUDA context, kernels)
        rows["fp16"] = ev.evaluate_model(fp16, tokens, p, device="cuda")
        rows["exl2 cached"] = ev.evaluate_model(exl2, tokens, p, device="cuda")
        share = ev.DEQUANT_CACHE_SHARE
        ev.DEQUANT_CACHE_SHARE = 0.0
        try:
            rows["exl2 per call"] = ev.evaluate_model(exl2, tokens, p, device="cuda")
        finally:
            ev.DEQUANT_CACHE_SHARE = share
    same = rows["exl2 cached"]["ppl"] == rows["exl2 per call"]["ppl"]
    print(f"GPU {torch.cuda.get_device_name()}; {a.windows} windows x {a.ctx} tokens; SmolLM2-135M shapes, random weights")
    print("| model | eval tok/s | dequant cache MiB | PPL |")
    print("|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['eval_tps']:.0f} | {r['dequant_cache_bytes'] / 2**20:.0f} | {r['ppl']:.4f} |")
    print(f"cached and per-call perplexity identical: {same}")
    if a.out:
        Path(a.out).write_text(json.dumps({k: {kk: r[kk] for kk in ("eval_tps", "dequant_cache_bytes", "ppl", "device")}
                                           for k, r in rows.items()} | {"identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
