"""Build a Model from a directory: FP16 Hugging Face weights or an EXL2 quantized folder.

The streaming helpers (load_embedding, load_layer, load_final_norm, load_head) let the
quantizer hold one decoder layer at a time, so host RAM stays near one layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exl2build.errors import InputError
from exl2build.model.config import ModelConfig
from exl2build.model.forward import MLP, Attention, DecoderLayer, Embedding, Model, RMSNorm, RotaryEmbedding
from exl2build.model.linear import EXL2Linear, FP16Linear, Linear
from exl2build.model.weights import WeightStore

SUPPORTED_QUANT_METHODS = ("exl2",)


def check_quant_method(cfg: ModelConfig) -> None:
    q = cfg.quantization_config
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method not in SUPPORTED_QUANT_METHODS:
        raise InputError(
            f"{cfg.path}/config.json: quantization_config.quant_method = {method!r} is not supported. "
            "exl2build reads FP16 models and EXL2 models (quant_method 'exl2'); use the FP16 source model."
        )


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear in a decoder layer."""
    h, hd = cfg.hidden_size, cfg.head_dim
    return {
        "self_attn.q_proj": (h, cfg.num_heads * hd),
        "self_attn.k_proj": (h, cfg.num_kv_heads * hd),
        "self_attn.v_proj": (h, cfg.num_kv_heads * hd),
        "self_attn.o_proj": (cfg.num_heads * hd, h),
        "mlp.gate_proj": (h, cfg.intermediate_size),
        "mlp.up_proj": (h, cfg.intermediate_size),
        "mlp.down_proj": (cfg.intermediate_size, h),
    }


def load_linear(store: WeightStore, key: str, K: int, N: int, device="cpu", bias: bool | None = None) -> Linear:
    """FP16 `<key>.weight` [N, K], or EXL2 `<key>.q_weight`... when present.

    `bias=None` loads a bias if the file has one; True requires it.
    """
    if store.has(f"{key}.q_weight"):
        return EXL2Linear(store.qtensor(key, K, N, device=device))
    w = store.get(f"{key}.weight", device, torch.float16, shape=(N, K))
    b = None
    if bias or (bias is None and store.has(f"{key}.bias")):
        b = store.get(f"{key}.bias", device, torch.float16, shape=(N,))
    return FP16Linear(w, b)


def load_norm(store: WeightStore, key: str, cfg: ModelConfig, device="cpu") -> RMSNorm:
    return RMSNorm(store.get(f"{key}.weight", device, torch.float16, shape=(cfg.hidden_size,)), cfg.rms_eps)


def load_embedding(store: WeightStore, cfg: ModelConfig, device="cpu") -> Embedding:
    key = f"{cfg.spec.embed_key}.weight"
    return Embedding(store.get(key, device, torch.float16, shape=(cfg.vocab_size, cfg.hidden_size)))


def load_layer(store: WeightStore, cfg: ModelConfig, i: int, device="cpu",
               rotary: RotaryEmbedding | None = None) -> DecoderLayer:
    spec = cfg.spec
    p = spec.layer_key(i)
    shapes = _linear_shapes(cfg)
    lin = {}
    for name, (K, N) in shapes.items():
        needs_bias = spec.qkv_bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        lin[name] = load_linear(store, f"{p}.{name}", K, N, device, bias=True if needs_bias else None)
    if rotary is None:
        rotary = RotaryEmbedding(cfg, device)
    attn = Attention(cfg, lin["self_attn.q_proj"], lin["self_attn.k_proj"], lin["self_attn.v_proj"],
                     lin["self_attn.o_proj"], rotary, i)
    mlp = MLP(lin["mlp.gate_proj"], lin["mlp.up_proj"], lin["mlp.down_proj"])
    return DecoderLayer(attn, mlp, load_norm(store, f"{p}.input_layernorm", cfg, device),
                        load_norm(store, f"{p}.post_attention_layernorm", cfg, device))


def load_final_norm(store: WeightStore, cfg: ModelConfig, device="cpu") -> RMSNorm:
    return load_norm(store, cfg.spec.norm_key, cfg, device)


def load_head(store: WeightStore, cfg: ModelConfig, device="cpu", embedding: Embedding | None = None) -> Linear:
    """lm_head: its own tensor(s) when present, else the (tied) embedding matrix."""
    key = cfg.spec.head_key
    if store.has(f"{key}.q_weight") or store.has(f"{key}.weight"):
        return load_linear(store, key, cfg.hidden_size, cfg.vocab_size, device)
    if not cfg.tie_word_embeddings:
        store.file_of(f"{key}.weight")  # raises the standard "missing tensor" InputError
    if embedding is not None:
        return FP16Linear(embedding.weight.data)
    return FP16Linear(load_embedding(store, cfg, device).weight.data)


def load_model(path: str | Path, device="cpu") -> tuple[Model, ModelConfig]:
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    check_quant_method(cfg)
    device = torch.device(device)
    store = WeightStore(path)
    try:
        rotary = RotaryEmbedding(cfg, device)
        embed = load_embedding(store, cfg, device)
        layers = [load_layer(store, cfg, i, device, rotary) for i in range(cfg.num_layers)]
        norm = load_final_norm(store, cfg, device)
        head = load_head(store, cfg, device, embedding=embed)
    finally:
        store.close()
    return Model(cfg, embed, layers, norm, head, rotary).eval(), cfg
