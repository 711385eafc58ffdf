"""A Llama-architecture HF folder with random fp16 weights (one model.safetensors), for benchmarks
that need real shapes without a download: embeddings, final norm and `layers` decoder layers
(no lm_head tensor: tied, or not needed by the step measured)."""

from __future__ import annotations

import json
from pathlib import Path


def write_random_llama(root: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                       vocab: int, rope_theta: float = 10000.0, max_positions: int = 4096, tie: bool = False,
                       seed: int = 0) -> Path:
    import torch  # imported here: callers may first redirect which exl2build modules load
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, i, nh, nkv, v = hidden, intermediate, heads, kv_heads, vocab
    hd = h // nh
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g).half(), "model.norm.weight": torch.ones(h).half()}
    shapes = {"self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h), "self_attn.v_proj": (nkv * hd, h),
              "self_attn.o_proj": (h, nh * hd), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    for n in range(layers):
        p = f"model.layers.{n}."
        for name, (o, k) in shapes.items():
            t[p + name + ".weight"] = (torch.randn(o, k, generator=g) * k**-0.5).half()
        t[p + "input_layernorm.weight"] = torch.ones(h).half()
        t[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": v,
        "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "max_position_embeddings": max_positions,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}))
    return root
