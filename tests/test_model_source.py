"""Source import: HF folders, .bin/.pt checkpoints, GGUF files (written here with gguf.GGUFWriter)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import LLAMA2_TOKENIZER, WIKI_TEST, make_tiny_llama
from exl2build.data.tokenizer import Tokenizer
from exl2build.errors import InputError
from exl2build.model.gguf import permute_rows, unpermute_rows
from exl2build.model.load import load_model
from exl2build.model.source import import_source

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
# Which GGUF type each tensor is stored as in the test file (norms stay F32 as llama.cpp keeps them).
_QTYPES = {"ffn_up.weight": Q.Q8_0, "ffn_down.weight": Q.Q4_1, "attn_v.weight": Q.BF16, "token_embd.weight": Q.Q8_0}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest]}"


# Byte offsets of the fp16 scale fields inside one block of each K-quant type (llama.cpp's layouts).
_K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def k_quant_blocks(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Raw K-quant data for a [rows, cols] tensor: random codes and sub-scales (every bit pattern
    is a valid block), block scales set to a small finite fp16 (gguf cannot quantize K types)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _K_SCALE_FIELDS[qtype]:
        data[:, :, off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return data.reshape(rows, cols // block * size)


def write_test_gguf(hf_dir: Path, out: Path, tokenizer: str = "llama", bpe=None, qtypes=None) -> dict[str, np.ndarray]:
    """Write `hf_dir` as a GGUF the way llama.cpp's converter would; return the expected fp16 HF tensors.

    qtypes: GGUF type per tensor name suffix (default _QTYPES); K-quant types get random valid blocks
    in place of the weights (the expected tensors are their dequantization)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if tokenizer == "llama":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
        n = sp.get_piece_size()
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:
        vocab, merges, specials = bpe
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(vocab)
        w.add_token_types([3 if t in specials else 1 for t in vocab])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab.index("<|endoftext|>"))
        w.add_eos_token_id(vocab.index("<|im_end|>"))
        w.add_chat_template("{{ messages }}")
    expected = {}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        arr = t.float().numpy()
        gname = _gguf_name(name)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            arr = permute_rows(torch.from_numpy(arr), cfg["num_attention_heads"]).numpy()
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            arr = permute_rows(torch.from_numpy(arr), cfg["num_key_value_heads"]).numpy()
        qtype = (qtypes or _QTYPES).get(gname.split(".", 2)[-1] if gname.startswith("blk") else gname)
        if t.dim() == 1:
            w.add_tensor(gname, arr.astype(np.float32))
            stored = arr
        elif qtype is None:
            w.add_tensor(gname, arr.astype(np.float16))
            stored = arr.astype(np.float16).astype(np.float32)
        else:
            if qtype in _K_SCALE_FIELDS:
                data = k_quant_blocks(arr.shape[0], arr.shape[1], qtype, seed=len(expected))
            else:
                data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
            stored = gguf.quants.dequantize(data, qtype)
        expected[name] = stored  # in llama.cpp (permuted) row order, un-permuted below
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"]
            expected[name] = unpermute_rows(torch.from_numpy(np.array(stored)), heads).numpy()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v.astype(np.float16) for k, v in expected.items()}


def test_permutation_round_trip():
    w = torch.randn(3 * 8, 5)
    p = permute_rows(w, 3)
    assert not torch.equal(p, w) and torch.equal(unpermute_rows(p, 3), w)


def _check_weights(out: Path, expected: dict[str, np.ndarray]):
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float16
        assert torch.equal(got[k], torch.from_numpy(v)), k


def test_gguf_llama_import_matches_weights_and_forward(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf", heads=4, kv_heads=2)
    expected = write_test_gguf(hf, tmp_path / "m.gguf")
    out = import_source(tmp_path / "m.gguf", tmp_path / "out")
    _check_weights(out, expected)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is False
    # Un-permuting is what makes the forward agree: weights that are exact in F16 give close logits.
    ids = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(1))
    a, _ = load_model(hf)
    b, _ = load_model(out)
    cos = torch.nn.functional.cosine_similarity(a(ids).flatten(), b(ids).flatten(), dim=0)
    assert cos > 0.99
    # The sentencepiece model rebuilt from GGUF metadata tokenizes like the original.
    orig, rebuilt = Tokenizer.from_dir(hf), Tokenizer.from_dir(out)
    assert rebuilt.backend == "sentencepiece" and rebuilt.bos_id == 1 and rebuilt.eos_id == 2
    text = "Hello  world!\n The 1990s: naïve café — 東京 ½ \t tabs"
    if WIKI_TEST.exists():
        text += WIKI_TEST.read_text()[:5000]
    assert rebuilt.encode(text) == orig.encode(text)
    assert rebuilt.decode(rebuilt.encode(text)) == orig.decode(orig.encode(text))


@pytest.mark.parametrize("qtypes", [
    {"ffn_up.weight": Q.Q4_K, "ffn_down.weight": Q.Q6_K, "ffn_gate.weight": Q.Q5_K, "attn_v.weight": Q.Q3_K,
     "attn_output.weight": Q.Q2_K},
    {"attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q6_K},  # K-quants under llama.cpp's Q/K row permutation
])
def test_gguf_k_quants_import(tmp_path, qtypes):
    """K-quant tensors (Q2_K..Q6_K, 256-value blocks) dequantize through the gguf package, Q/K rows
    un-permuted, into exactly the expected fp16 weights; the imported model runs."""
    hf = make_tiny_llama(tmp_path / "hf", hidden=256, intermediate=512, heads=4, kv_heads=2)
    expected = write_test_gguf(hf, tmp_path / "k.gguf", qtypes=qtypes)
    out = import_source(tmp_path / "k.gguf", tmp_path / "out")
    _check_weights(out, expected)
    model, _ = load_model(out)
    logits = model(torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(2)))
    assert torch.isfinite(logits).all()


def _tiny_bpe():
    """A small byte-level BPE trained here, standing in for SmolLM2's GPT-2 style vocabulary."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog in 2024.", "Tokenizers rebuild merges: hello world!"] * 20
    t.train_from_iterator(corpus, trainer)
    data = json.loads(t.to_str())
    vocab = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return t, vocab, merges, specials


def test_gguf_qwen2_bpe_import(tmp_path):
    ref_tok, vocab, merges, specials = _tiny_bpe()
    hf = make_tiny_llama(tmp_path / "hf", arch="Qwen2ForCausalLM", qkv_bias=True, tie=True, vocab=len(vocab))
    expected = write_test_gguf(hf, tmp_path / "q.gguf", tokenizer="gpt2", bpe=(vocab, merges, specials))
    out = import_source(tmp_path / "q.gguf", tmp_path / "out", kind="gguf")
    _check_weights(out, expected)  # Qwen2 q/k are not permuted by llama.cpp; biases carried over
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    tok = Tokenizer.from_dir(out)
    assert tok.backend == "tokenizers" and tok.eos_id == vocab.index("<|im_end|>")
    assert tok.chat_template == "{{ messages }}"
    text = "The lazy fox, 12345 hello<|im_end|> world!\n  spaced"
    assert tok.encode(text) == ref_tok.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    load_model(out)[0](torch.tensor([[1, 2, 3]]))


def test_gguf_unsupported_arch_and_bad_file(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(InputError, match="'gpt2'.*supported: llama, qwen2"):
        import_source(tmp_path / "x.gguf", tmp_path / "o")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match="cannot be read as GGUF"):
        import_source(tmp_path / "bad.gguf", tmp_path / "o2")


def test_hf_dir_import_links_files(tiny_llama, tmp_path):
    out = import_source(tiny_llama, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    assert (out / "tokenizer.model").is_file() and (out / "config.json").is_file()


def test_hf_dir_import_validates(tiny_llama, tmp_path):
    t = load_file(tiny_llama / "model.safetensors")
    del t["model.layers.0.self_attn.k_proj.weight"]
    from safetensors.torch import save_file

    save_file(t, tiny_llama / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        import_source(tiny_llama, tmp_path / "out")


def test_hf_dir_with_tensors_the_forward_would_drop_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    t = load_file(tiny_llama / "model.safetensors")
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # old checkpoints carry it: harmless
    save_file(t, tiny_llama / "model.safetensors")
    import_source(tiny_llama, tmp_path / "ok")
    t["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(128, dtype=torch.float16)
    t["model.layers.1.mlp.down_proj.bias"] = torch.zeros(128, dtype=torch.float16)
    save_file(t, tiny_llama / "model.safetensors")
    with pytest.raises(InputError, match=r"'model\.layers\.1\.mlp\.down_proj\.bias' \(and 1 more\) is not part of a "
                                         r"LlamaForCausalLM layer.*would drop it"):
        import_source(tiny_llama, tmp_path / "out")


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_llama_config_with_biased_linears_is_refused(tiny_llama, tmp_path, key):
    c = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**c, key: True}))
    with pytest.raises(InputError, match=f"{key}=true .* is not supported for LlamaForCausalLM"):
        import_source(tiny_llama, tmp_path / "out")


def test_bin_import_with_tied_fp32_weights(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf", tie=True)
    sd = {k: v.float() for k, v in load_file(hf / "model.safetensors").items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # shared storage, as torch.save of a tied model
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.model"):
        (src / f).write_bytes((hf / f).read_bytes())
    out = import_source(src, tmp_path / "out")
    got = load_file(out / "model.safetensors")
    for k, v in sd.items():
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.half())
    ids = torch.tensor([[1, 5, 9, 200]])
    torch.testing.assert_close(load_model(out)[0](ids), load_model(hf)[0](ids))


class _Pickled:
    """An arbitrary object: torch.load(weights_only=True) must refuse to build it."""


def test_bin_with_arbitrary_objects_is_refused(tmp_path, tiny_llama):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    torch.save({"w": torch.zeros(2), "obj": _Pickled()}, src / "model.pt")
    with pytest.raises(InputError, match="weights_only=True"):
        import_source(src / "model.pt", tmp_path / "out")


def test_unknown_source(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(InputError, match="cannot tell"):
        import_source(tmp_path / "src", tmp_path / "out")
    with pytest.raises(InputError, match="not found"):
        import_source(tmp_path / "nope", tmp_path / "out")


@pytest.mark.slow
def test_real_smollm2_gguf_perplexity(tmp_path):
    try:
        gguf_path = subprocess.run(["bash", str(LLAMA2_TOKENIZER.parents[2] / "tools" / "get-smollm2")],
                                   capture_output=True, text=True, timeout=600, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    if not WIKI_TEST.exists():
        pytest.skip(f"{WIKI_TEST} missing")
    out = import_source(gguf_path, tmp_path / "smol")
    model, cfg = load_model(out)
    tok = Tokenizer.from_dir(out)
    assert cfg.num_layers == 30 and cfg.tie_word_embeddings and tok.vocab_size == 49152
    ids = torch.tensor(tok.encode(WIKI_TEST.read_text()[:60000])[:1024])
    logits = model(ids[None])[0]
    ppl = math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp16) ppl on the first 1024 wiki.test.raw tokens: {ppl:.2f}")
    assert ppl < 40
    from exl2build.model.generate import generate

    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in tok.decode(generate(model, tok, prompt, 16).new_ids)


def test_fp16_overflow_is_refused(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf")
    sd = {k: v.float() for k, v in load_file(hf / "model.safetensors").items()}
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_bytes((hf / "config.json").read_bytes())
    with pytest.raises(InputError, match=r"down_proj\.weight.*fp16 range"):
        import_source(src, tmp_path / "out")
