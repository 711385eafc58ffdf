"""GGUF (llama.cpp) -> FP16 Hugging Face folder: tensors, config.json and the tokenizer.

Facts about llama.cpp's files that this relies on:
- GGUF tensor shapes are listed innermost-first (ne0 = in_features), so a [N, K] HF
  weight appears as shape [K, N]; gguf.quants.dequantize returns the [N, K] array.
- For arch "llama", llama.cpp's converter permutes the rows of q_proj/k_proj per head from
  HF's rotate-half layout to interleaved pairs; we apply the inverse. Qwen2 is not permuted.
- The tokenizer is stored as token lists in `tokenizer.ggml.*`: "gpt2" = byte-level BPE
  (rebuilt as tokenizer.json), "llama" = sentencepiece BPE (rebuilt as tokenizer.model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from exl2build.errors import InputError
from exl2build.model.weights import to_dtype_checked

GGUF_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF tensor name, or None when it has no HF counterpart."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k permutation: per head, rotate-half row order -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of permute_rows: interleaved pairs -> HF rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFFile:
    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct errors on bad files
            raise InputError(f"{self.path}: cannot be read as GGUF ({e}). Re-download the file.") from None
        self._config: dict | None = None
        self.arch = self.meta("general.architecture")
        if self.arch not in GGUF_ARCHS:
            raise InputError(
                f"{self.path}: GGUF architecture {self.arch!r} (general.architecture) is not supported; "
                f"supported: {', '.join(GGUF_ARCHS)}. Convert a Llama/Mistral/Qwen2 model instead."
            )

    def meta(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    def arch_meta(self, key: str, default=None):
        return self.meta(f"{self.arch}.{key}", default)

    def require(self, key: str):
        v = self.arch_meta(key)
        if v is None:
            raise InputError(f"{self.path}: metadata key '{self.arch}.{key}' is missing; the GGUF file is incomplete.")
        return v

    # -- config

    def config(self) -> dict:
        if self._config is None:
            self._config = self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict:
        hidden = int(self.require("embedding_length"))
        heads = int(self.require("attention.head_count"))
        kv = int(self.arch_meta("attention.head_count_kv", heads))
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise InputError(
                f"{self.path}: has per-dimension RoPE factors (rope_freqs.weight, Llama-3.1 style) that cannot "
                "be expressed in config.json here. Import the Hugging Face FP16 model instead."
            )
        tokens = self.meta("tokenizer.ggml.tokens")
        vocab = self.arch_meta("vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            vocab = int(self._tensor("token_embd.weight").shape[-1])
        arch_cls, model_type = GGUF_ARCHS[self.arch]
        cfg = {
            "architectures": [arch_cls],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": int(self.require("feed_forward_length")),
            "num_hidden_layers": int(self.require("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": int(vocab),
            "rms_norm_eps": float(self.arch_meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.arch_meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.arch_meta("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "torch_dtype": "float16",
        }
        key_len = self.arch_meta("attention.key_length")
        if key_len is not None and int(key_len) != hidden // heads:
            cfg["head_dim"] = int(key_len)
        scaling = self.arch_meta("rope.scaling.type")
        if scaling and scaling != "none":
            rs = {"rope_type": scaling, "factor": float(self.arch_meta("rope.scaling.factor", 1.0))}
            orig = self.arch_meta("rope.scaling.original_context_length")
            if orig:
                rs["original_max_position_embeddings"] = int(orig)
            cfg["rope_scaling"] = rs
        for which in ("bos", "eos"):
            v = self.meta(f"tokenizer.ggml.{which}_token_id")
            if v is not None:
                cfg[f"{which}_token_id"] = int(v)
        return cfg

    # -- tensors

    def _tensor(self, name: str):
        for t in self.reader.tensors:
            if t.name == name:
                return t
        raise InputError(f"{self.path}: tensor {name!r} is missing; the GGUF file is incomplete.")

    def tensors(self):
        """Yield (hf_name, fp16 tensor) one at a time, dequantized and un-permuted."""
        from gguf.quants import dequantize

        cfg = self.config()
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue  # e.g. rope_freqs is rejected in config(); nothing else is needed
            try:
                arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise InputError(
                    f"{self.path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the gguf "
                    f"package cannot dequantize ({e}). Use a GGUF with F16/BF16/Q8_0/Q4_x/K-quant tensors."
                ) from None
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            # np.array copies: F32/F16 tensors come back as read-only views of the memory map.
            w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
            if self.arch == "llama" and name.endswith("self_attn.q_proj.weight"):
                w = unpermute_rows(w, heads)
            elif self.arch == "llama" and name.endswith("self_attn.k_proj.weight"):
                w = unpermute_rows(w, kv)
            yield name, to_dtype_checked(w, torch.float16, f"{self.path}: tensor {t.name}").contiguous()

    # -- tokenizer

    def write_tokenizer(self, out: Path) -> None:
        model = self.meta("tokenizer.ggml.model")
        tokens = self.meta("tokenizer.ggml.tokens")
        if not tokens:
            raise InputError(f"{self.path}: has no tokenizer (tokenizer.ggml.tokens). Use a GGUF with its vocabulary.")
        types = self.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        if model == "gpt2":
            _write_bpe_tokenizer(out, tokens, types, self.meta("tokenizer.ggml.merges") or [],
                                 self.meta("tokenizer.ggml.pre", "default"))
        elif model == "llama":
            _write_spm_tokenizer(out, tokens, types, self.meta("tokenizer.ggml.scores") or [0.0] * len(tokens),
                                 self.meta, bool(self.meta("tokenizer.ggml.add_space_prefix", True)))
        else:
            raise InputError(
                f"{self.path}: tokenizer type {model!r} (tokenizer.ggml.model) is not supported; "
                "supported: gpt2 (byte-level BPE), llama (sentencepiece)."
            )
        bos, eos = self.meta("tokenizer.ggml.bos_token_id"), self.meta("tokenizer.ggml.eos_token_id")
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast" if model == "gpt2" else "LlamaTokenizer",
            "add_bos_token": bool(self.meta("tokenizer.ggml.add_bos_token", model == "llama")),
            "add_eos_token": False,
            "model_max_length": int(self.arch_meta("context_length", 2048)),
            "clean_up_tokenization_spaces": False,
        }
        if bos is not None:
            tcfg["bos_token"] = tokens[int(bos)]
        if eos is not None:
            tcfg["eos_token"] = tokens[int(eos)]
        unk = self.meta("tokenizer.ggml.unknown_token_id")
        if unk is not None:
            tcfg["unk_token"] = tokens[int(unk)]
        pad = self.meta("tokenizer.ggml.padding_token_id")
        if pad is not None:
            tcfg["pad_token"] = tokens[int(pad)]
        template = self.meta("tokenizer.chat_template")
        if template:
            tcfg["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
        gen = {k: int(v) for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


# Pre-tokenizer regexes for llama.cpp's `tokenizer.ggml.pre` names (facts from llama.cpp).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":  # digits one by one, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level  # "default", "gpt-2" and unknown names: GPT-2's byte-level regex


def _write_bpe_tokenizer(out: Path, tokens: list[str], types: list[int], merges: list[str], pre: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # CONTROL (3) and USER_DEFINED (4) tokens are matched whole, before BPE.
    added = [AddedToken(t, special=(ty == 3), normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    if added:
        tok.add_tokens(added)
    tok.save(str(out / "tokenizer.json"))


def _write_spm_tokenizer(out: Path, tokens, types, scores, meta, add_space_prefix: bool) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for t, ty, s in zip(tokens, types, scores):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(s), int(ty) if int(ty) in (1, 2, 3, 4, 5, 6) else 1
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = any(int(ty) == 6 for ty in types)
    ids = (("unk_id", "unknown", 0), ("bos_id", "bos", 1), ("eos_id", "eos", 2), ("pad_id", "padding", -1))
    for field, key, default in ids:
        v = meta(f"tokenizer.ggml.{key}_token_id")
        setattr(m.trainer_spec, field, int(v) if v is not None else default)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = add_space_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
