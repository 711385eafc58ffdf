"""Forward pass against transformers, KV-cache consistency, loader errors, generation."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from exl2build.errors import InputError
from exl2build.model.config import ModelConfig
from exl2build.model.forward import RotaryEmbedding
from exl2build.model.generate import EOS_CHECK_EVERY, generate
from exl2build.model.load import load_embedding, load_final_norm, load_head, load_layer, load_model
from exl2build.model.weights import WeightStore


def _ids(B=2, T=19, vocab=32000, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, arch, ids):
    import transformers

    cls = getattr(transformers, arch)
    ref = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="LlamaForCausalLM"),
        dict(arch="LlamaForCausalLM", tie=True, heads=4, kv_heads=4),
        dict(arch="Qwen2ForCausalLM", qkv_bias=True, tie=True),
        dict(arch="MistralForCausalLM", heads=8, kv_heads=2),
    ],
)
def test_forward_matches_transformers(tmp_path, kw):
    d = make_tiny_llama(tmp_path / "m", **kw)
    if kw["arch"] != "LlamaForCausalLM":  # these HF configs need a few more keys
        c = json.loads((d / "config.json").read_text())
        c.update(sliding_window=None, use_sliding_window=False)
        (d / "config.json").write_text(json.dumps(c))
    model, cfg = load_model(d)
    ids = _ids()
    ours = model(ids)
    assert ours.dtype == torch.float32 and ours.shape == (2, 19, 32000)
    ref = _hf_logits(d, kw["arch"], ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # hidden() + head equals forward (evaluation computes logits in chunks from hidden)
    torch.testing.assert_close(model.head(model.hidden(ids)), ours)


SLIDING = [
    ("MistralForCausalLM", dict(sliding_window=6), [6, 6]),
    # Qwen2: a window only with use_sliding_window, from layer max_window_layers on.
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), [None, 6]),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"]), [6, None]),
    ("Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=6), []),
]


def _windowed(tmp_path, arch, keys):
    d = make_tiny_llama(tmp_path / "m", arch=arch, qkv_bias=arch == "Qwen2ForCausalLM", heads=8, kv_heads=2)
    c = json.loads((d / "config.json").read_text())
    c.update(keys)
    (d / "config.json").write_text(json.dumps(c))
    return d


@pytest.mark.parametrize("arch,keys,windows", SLIDING)
def test_sliding_window_matches_transformers(tmp_path, arch, keys, windows):
    """Sequences longer than the window: each query sees only the last `window` keys, as transformers does."""
    d = _windowed(tmp_path, arch, keys)
    model, cfg = load_model(d)
    assert cfg.sliding_windows == windows
    ids = _ids()  # 19 tokens > the window of 6
    ours = model(ids)
    torch.testing.assert_close(ours, _hf_logits(d, arch, ids), atol=1e-4, rtol=1e-4)
    # Through the KV cache in pieces (history + several tokens, then one at a time), and the
    # static (CUDA-graph) step's masked attention: the same logits.
    cache = model.new_cache(2, 24)
    parts = [model(ids[:, a:b], cache) for a, b in ((0, 4), (4, 13), (13, 14), (14, 15))]
    static = model.new_cache(2, 24)
    model(ids[:, :15], static)
    model.rotary.ensure(24)
    for i in range(15, 19):
        static.pos_t = torch.tensor([static.length])
        parts.append(model(ids[:, i : i + 1], static))
        static.pos_t = None
        static.length += 1
    torch.testing.assert_close(torch.cat(parts, 1), ours, atol=1e-4, rtol=1e-4)


def test_sliding_window_changes_only_long_sequences(tmp_path):
    d = _windowed(tmp_path, "MistralForCausalLM", dict(sliding_window=6))
    windowed, _ = load_model(d)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "sliding_window": None}))
    full, cfg = load_model(d)
    assert cfg.sliding_windows == []
    ids = _ids()
    torch.testing.assert_close(windowed(ids[:, :6]), full(ids[:, :6]))
    assert not torch.allclose(windowed(ids)[:, 6:], full(ids)[:, 6:], atol=1e-3)


@pytest.mark.parametrize("keys,match", [
    (dict(sliding_window=0), "sliding_window=0 is not a positive number"),
    (dict(sliding_window="4k"), "sliding_window='4k'"),
])
def test_bad_sliding_window_is_input_error(tmp_path, keys, match):
    d = _windowed(tmp_path, "MistralForCausalLM", keys)
    with pytest.raises(InputError, match=match):
        ModelConfig.from_dir(d)


def test_kv_cache_matches_full_forward(tiny_llama):
    model, _ = load_model(tiny_llama)
    ids = _ids(T=24)
    full = model(ids)
    cache = model.new_cache(2, 32)
    parts = [model(ids[:, a:b], cache) for a, b in ((0, 7), (7, 12), (12, 13), (13, 24))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == 24


def test_greedy_generation_equals_full_forward_argmax(tiny_llama):
    model, _ = load_model(tiny_llama)
    prompt = _ids(B=1, T=5)[0].tolist()
    res = generate(model, None, prompt, max_new_tokens=12)
    assert res.new_tokens == 12 and res.ids[:5] == prompt
    # Each generated token is the argmax of a full (cache-free) forward over everything before it.
    full = model(torch.tensor(res.ids[:-1]))
    assert full[4:].argmax(-1).tolist() == res.new_ids
    assert res.prefill_s > 0 and res.decode_s > 0


def test_generation_stops_at_eos(tiny_llama):
    model, _ = load_model(tiny_llama)
    free = generate(model, None, [1, 2, 3], 40)
    # Each of these tokens as EOS: the output ends at its first occurrence, even when that is
    # not a step at which generate looks at the finished flag (every EOS_CHECK_EVERY steps).
    for eos in dict.fromkeys(free.new_ids):
        first = free.new_ids.index(eos)
        res = generate(model, types.SimpleNamespace(stop_ids=[eos]), [1, 2, 3], 40)
        assert res.new_ids == free.new_ids[: first + 1] and res.stopped_at_eos
        # The speed counts the steps run: up to the next flag read (every EOS_CHECK_EVERY steps).
        assert res.decode_steps == min((first // EOS_CHECK_EVERY + 1) * EOS_CHECK_EVERY, 40) - 1
        res = generate(model, types.SimpleNamespace(stop_ids=[eos]), [1, 2, 3], 40, stop_at_eos=False)
        assert res.new_ids == free.new_ids and not res.stopped_at_eos


def test_generation_stops_at_any_stop_id(tiny_llama):
    """An instruct model ends a turn with one of several ids (generation_config's eos list)."""
    model, _ = load_model(tiny_llama)
    free = generate(model, None, [1, 2, 3], 40).new_ids
    late, early = free[-1], free[3]
    first = min(free.index(late), free.index(early))
    res = generate(model, types.SimpleNamespace(stop_ids=[late, early]), [1, 2, 3], 40)
    assert res.new_ids == free[: first + 1] and res.stopped_at_eos


def test_stop_ids_gather_every_eos(tmp_path):
    from exl2build.data.tokenizer import Tokenizer

    d = make_tiny_llama(tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))  # id 0 in the Llama-2 model
    tok = Tokenizer.from_dir(d)
    assert tok.eos_id == 2 and tok.stop_ids == [2, 7, 9, 0]


def test_batched_generation_stops_when_every_row_has_ended(tiny_llama):
    model, _ = load_model(tiny_llama)
    prompts = _ids(B=2, T=4)
    a, b = generate(model, None, prompts, 30).rows
    only_a = next(t for t in a[3:] if t not in b)  # row b never produces it: no stop
    res = generate(model, types.SimpleNamespace(stop_ids=[only_a]), prompts, 30)
    assert res.rows == [a, b] and not res.stopped_at_eos
    # Both rows the same prompt: they end together, at the first EOS.
    same = torch.stack([prompts[0], prompts[0]])
    res = generate(model, types.SimpleNamespace(stop_ids=[a[5]]), same, 30)
    end = a.index(a[5])
    assert res.rows == [a[: end + 1]] * 2 and res.stopped_at_eos


def test_sampling_is_seeded(tiny_llama):
    model, _ = load_model(tiny_llama)
    a = generate(model, None, [1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, None, [1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, None, [1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=4)
    assert a.ids == b.ids and a.ids != c.ids


def test_top_k_keeps_the_k_most_likely():
    from exl2build.model.generate import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    picked = set(sample_next(logits, 5.0, 1.0, g, top_k=2).tolist())
    assert picked == {1, 3}  # a hot temperature, but only the two best survive
    assert set(sample_next(logits, 5.0, 1.0, g).tolist()) == {0, 1, 2, 3, 4}  # top_k 0: off
    assert torch.equal(sample_next(logits, 1.0, 1.0, g, top_k=1), logits.argmax(-1))


def test_streaming_pieces_rebuild_the_model(tiny_llama):
    model, cfg = load_model(tiny_llama)
    store = WeightStore(tiny_llama)
    ids = _ids(B=1, T=9)
    x = load_embedding(store, cfg).forward(ids, torch.float32)
    for i in range(cfg.num_layers):
        layer = load_layer(store, cfg, i)
        x = layer.mlp_block(layer.attn_block(x, 0))
    logits = load_head(store, cfg)(load_final_norm(store, cfg)(x))
    torch.testing.assert_close(logits, model(ids))


def test_observe_hook_sees_linear_inputs(tiny_llama):
    model, cfg = load_model(tiny_llama)
    seen = []
    model.layers[0].self_attn.q_proj.observe = lambda x: seen.append(x.shape)
    model(_ids(B=2, T=6))
    assert seen == [torch.Size([12, cfg.hidden_size])]


def test_config_saved_by_transformers_5_matches_transformers(tiny_llama, tmp_path):
    """transformers 5 writes RoPE as `rope_parameters` (theta inside, no top-level rope_theta)."""
    import transformers

    c = json.loads((tiny_llama / "config.json").read_text())
    c.update(rope_theta=500000.0, max_position_embeddings=256, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    (tiny_llama / "config.json").write_text(json.dumps(c))
    transformers.AutoConfig.from_pretrained(tiny_llama).save_pretrained(tiny_llama)
    saved = json.loads((tiny_llama / "config.json").read_text())
    if "rope_theta" in saved:
        pytest.skip("this transformers writes the old top-level RoPE keys")
    assert saved["rope_parameters"]["rope_theta"] == 500000.0
    model, cfg = load_model(tiny_llama)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    ids = _ids(T=40)
    torch.testing.assert_close(model(ids), _hf_logits(tiny_llama, "LlamaForCausalLM", ids), atol=1e-4, rtol=1e-4)


def test_rope_scaling_variants(tiny_llama):
    cfg = ModelConfig.from_dir(tiny_llama)
    base = RotaryEmbedding(cfg).inv_freq
    cfg.rope_scaling = {"type": "linear", "factor": 4.0}
    torch.testing.assert_close(RotaryEmbedding(cfg).inv_freq, base / 4)
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}
    f = RotaryEmbedding(cfg).inv_freq
    assert f[0] == base[0] and torch.isclose(f[-1], base[-1] / 8)
    cfg.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    r = RotaryEmbedding(cfg)
    assert r.attention_factor > 1 and torch.isclose(r.inv_freq[-1], base[-1] / 4)
    cfg.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    r = RotaryEmbedding(cfg)  # within max_position_embeddings: the default frequencies
    assert torch.equal(r.inv_freq, base) and r.limit == cfg.max_position_embeddings
    r.cos_sin(0, cfg.max_position_embeddings, torch.float32)
    with pytest.raises(InputError, match="dynamic.*past max_position_embeddings"):
        r.cos_sin(cfg.max_position_embeddings, 1, torch.float32)
    cfg.rope_scaling = {"rope_type": "longrope", "factor": 2.0}
    with pytest.raises(InputError, match="longrope"):
        RotaryEmbedding(cfg)


def test_dynamic_rope_matches_transformers_within_max_positions(tiny_llama):
    c = json.loads((tiny_llama / "config.json").read_text())
    c.update(max_position_embeddings=48, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    (tiny_llama / "config.json").write_text(json.dumps(c))
    model, _ = load_model(tiny_llama)
    ids = _ids(T=48)
    torch.testing.assert_close(model(ids), _hf_logits(tiny_llama, "LlamaForCausalLM", ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="max_position_embeddings=48"):
        model(_ids(T=49))


def test_missing_config_is_input_error(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)


def test_unknown_architecture_lists_supported(tiny_llama):
    c = json.loads((tiny_llama / "config.json").read_text())
    c["architectures"] = ["GPTNeoXForCausalLM"]
    (tiny_llama / "config.json").write_text(json.dumps(c))
    with pytest.raises(InputError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        load_model(tiny_llama)


def test_missing_tensor_names_tensor_and_files(tiny_llama):
    t = load_file(tiny_llama / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, tiny_llama / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        load_model(tiny_llama)


def test_shape_mismatch_is_input_error(tiny_llama):
    c = json.loads((tiny_llama / "config.json").read_text())
    c["intermediate_size"] = 200
    (tiny_llama / "config.json").write_text(json.dumps(c))
    with pytest.raises(InputError, match="gate_proj.*shape"):
        load_model(tiny_llama)


def test_unsupported_quant_method(tiny_llama):
    c = json.loads((tiny_llama / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "gptq"}
    (tiny_llama / "config.json").write_text(json.dumps(c))
    with pytest.raises(InputError, match="gptq"):
        load_model(tiny_llama)


def test_sharded_weights_with_and_without_index(tiny_llama):
    ref, _ = load_model(tiny_llama)
    t = load_file(tiny_llama / "model.safetensors")
    (tiny_llama / "model.safetensors").unlink()
    names = sorted(t)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in shards.items():
        save_file({k: t[k] for k in ks}, tiny_llama / f)
    ids = _ids(B=1, T=8)
    torch.testing.assert_close(load_model(tiny_llama)[0](ids), ref(ids))
    wm = {k: f for f, ks in shards.items() for k in ks}
    (tiny_llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    torch.testing.assert_close(load_model(tiny_llama)[0](ids), ref(ids))


def test_positions_as_offset_or_tensor(tiny_llama):
    model, cfg = load_model(tiny_llama)
    x = model.embed(_ids(B=1, T=6))
    layer = model.layers[0]
    torch.testing.assert_close(layer.attn_block(x, 3), layer.attn_block(x, torch.arange(3, 9)))
    assert not torch.allclose(layer.attn_block(x, 0), layer.attn_block(x, 3))


def test_static_cache_mode_matches_eager(tiny_llama):
    """The CUDA-graph decode path (device positions, masked full-buffer attention) on CPU."""
    model, _ = load_model(tiny_llama)
    ids = _ids(B=2, T=12)
    eager = model.new_cache(2, 16)
    static = model.new_cache(2, 16)
    model(ids[:, :9], eager)
    model(ids[:, :9], static)
    model.rotary.ensure(16)
    for i in range(9, 12):
        want = model(ids[:, i : i + 1], eager)
        static.pos_t = torch.tensor([static.length])
        got = model(ids[:, i : i + 1], static)
        static.pos_t = None
        static.length += 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_swiglu_down_projection_fuses_only_on_cuda():
    """The one-launch SwiGLU down projection is for EXL2 linears on CUDA; elsewhere the MLP runs
    silu_mul and the linear (project_swiglu declines), and the kernel entry point says why."""
    from exl2build import kernels
    from exl2build.model.linear import FP16Linear, project_swiglu

    g = torch.randn(1, 8)
    assert project_swiglu(FP16Linear(torch.randn(4, 8)), g, g) is None
    with pytest.raises(ValueError, match="CUDA only"):
        kernels.exl2_matmul_swiglu(g.half(), g.half(), None)
