"""Registry of supported decoder architectures and the facts that differ between them.

All three are the same Llama-style pre-norm decoder (RMSNorm, RoPE, GQA attention,
SwiGLU MLP); they differ only in whether q/k/v carry a bias, how the config sets a sliding
attention window, and naming details.
"""

from __future__ import annotations

from dataclasses import dataclass

from exl2build.errors import InputError


@dataclass(frozen=True)
class ArchSpec:
    name: str  # HF class name, e.g. "LlamaForCausalLM"
    model_type: str  # config.json "model_type"
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    layer_prefix: str = "model.layers"
    embed_key: str = "model.embed_tokens"
    norm_key: str = "model.norm"
    head_key: str = "lm_head"
    attn_linears: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp_linears: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # How config.json sets sliding-window attention (ModelConfig.sliding_windows): "none";
    # "mistral": every layer, `sliding_window` (4096 where the key is absent, as transformers);
    # "qwen2": only with `use_sliding_window`, on the layers `layer_types` (or max_window_layers) names.
    sliding_window: str = "none"

    def layer_key(self, i: int) -> str:
        return f"{self.layer_prefix}.{i}"

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attn_linears + self.mlp_linears


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", "llama", qkv_bias=False),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", "mistral", qkv_bias=False, sliding_window="mistral"),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", "qwen2", qkv_bias=True, sliding_window="qwen2"),
}


def get_arch(name: str, source: str = "config.json") -> ArchSpec:
    """Look up an architecture by its HF class name; unknown names raise InputError."""
    spec = ARCHITECTURES.get(name)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise InputError(
            f"{source}: architecture {name!r} (key 'architectures') is not supported. "
            f"Supported architectures: {supported}. Convert a model of one of these "
            "architectures, or add an ArchSpec for it in exl2build/model/arch.py."
        )
    return spec
