"""Shared fixtures: paths into ../shared and a tiny random Llama model on disk."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see exl2build/__init__.py

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
WIKI_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


def _native_has_cuda() -> bool:
    try:
        from exl2build import _native
    except ImportError:  # pragma: no cover - only when the package was never built
        return False
    return bool(getattr(_native, "built_with_cuda", False))


# `pytestmark = NEEDS_CUDA` in a test module: its tests are CUDA tests (`-m cuda`), skipped
# without a GPU or without the CUDA kernels.
NEEDS_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _native_has_cuda(), reason="exl2build._native was built without CUDA"),
]


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: tests read shared data from ../shared beside the checkout")
    return path


def make_tiny_llama(
    root: Path,
    *,
    layers: int = 2,
    hidden: int = 128,
    intermediate: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 32000,
    tie: bool = False,
    arch: str = "LlamaForCausalLM",
    qkv_bias: bool = False,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny random Llama-architecture HF directory with the Llama-2 tokenizer (or, with
    tokenizer=False, none: enough for load_model, and needs nothing from ../shared)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.float16)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden, std=1.0), "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(hidden, generator=g)).half()
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(hidden, generator=g)).half()
        t[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden, std=hidden**-0.5)
        t[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden, std=hidden**-0.5)
        t[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden, std=hidden**-0.5)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim, std=hidden**-0.5)
        t[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden, std=hidden**-0.5)
        t[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden, std=hidden**-0.5)
        t[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate, std=intermediate**-0.5)
        if qkv_bias:
            for name, n in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
                t[p + f"self_attn.{name}_proj.bias"] = rnd(n, std=0.02)
    if not tie:
        t["lm_head.weight"] = rnd(vocab, hidden, std=hidden**-0.5)
    save_file(t, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": [arch],
        "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[arch],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        shutil.copy(_require(LLAMA2_TOKENIZER), root / "tokenizer.model")
    return root


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def wiki_test() -> Path:
    return _require(WIKI_TEST)


@pytest.fixture
def wiki_valid() -> Path:
    return _require(WIKI_VALID)
