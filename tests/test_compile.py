"""compile_full: shards, tensor order, copied files, config, determinism."""

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exl2build.errors import InputError, StepError
from exl2build.format.compile import compile_full, tensor_order

QC = {"quant_method": "exl2", "version": "0.1.0", "bits": 4.0, "head_bits": 6,
      "calibration": {"rows": 2, "length": 8, "dataset": "t"}}


def _source(d):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    (d / "tokenizer.json").write_text("{}")
    (d / "generation_config.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text("{}")  # points at source weights: must not be copied
    (d / "pytorch_model.bin").write_bytes(b"x")
    save_file({"a": torch.zeros(1)}, str(d / "model.safetensors"))
    return d


def _quantized(d, layers=3):
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(64, 32, generator=g).half()}, str(d / "embed.safetensors"))
    for i in range(layers):
        t = {f"model.layers.{i}.mlp.up_proj.q_weight": torch.randint(0, 2**31 - 1, (64, 64), generator=g, dtype=torch.int32),
             f"model.layers.{i}.input_layernorm.weight": torch.ones(32, dtype=torch.float16)}
        save_file(t, str(d / f"layer-{i:04d}.safetensors"))
    save_file({"model.norm.weight": torch.ones(32).half(), "lm_head.q_weight": torch.zeros(8, 32, dtype=torch.int32)},
              str(d / "head.safetensors"))
    return d


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_single_file_and_copies(tmp_path):
    src, q = _source(tmp_path / "src"), _quantized(tmp_path / "q")
    info = compile_full(src, q, tmp_path / "out", 0, QC)
    out = tmp_path / "out"
    assert info["files"] == ["output.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "output.safetensors", "tokenizer.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == QC and cfg["hidden_size"] == 8
    t = _read(out / "output.safetensors")
    assert len(t) == info["tensors"] == 1 + 3 * 2 + 2
    for f in q.iterdir():
        for k, v in _read(f).items():
            assert torch.equal(t[k], v)


def test_rope_parameters_also_written_as_the_keys_exllamav2_reads(tmp_path):
    """transformers 5 keeps RoPE in `rope_parameters`; exllamav2 reads `rope_theta` / `rope_scaling`."""
    src = _source(tmp_path / "src")
    rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "rope_parameters": rp}))
    compile_full(src, _quantized(tmp_path / "q"), tmp_path / "out", 0, QC)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"] == rp and cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {k: v for k, v in rp.items() if k != "rope_theta"}
    # No scaling: theta alone; a config in the old spelling is copied as it is.
    (src / "config.json").write_text(json.dumps({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
    compile_full(src, _quantized(tmp_path / "q2"), tmp_path / "out2", 0, QC)
    cfg = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and "rope_scaling" not in cfg


def test_shards_stay_within_size_and_are_deterministic(tmp_path):
    src, q = _source(tmp_path / "src"), _quantized(tmp_path / "q", layers=6)
    limit_mb = 0.04  # ~42 KB: each layer's 16 KB q_weight forces several shards
    info = compile_full(src, q, tmp_path / "a", limit_mb, QC)
    n = len(info["files"])
    assert n > 1
    assert info["files"] == [f"output-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    names = []
    for f in info["files"]:
        assert (tmp_path / "a" / f).stat().st_size <= limit_mb * 1024 * 1024
        with safe_open(str(tmp_path / "a" / f), framework="pt") as h:
            names += sorted(h.keys(), key=tensor_order)
    assert names == sorted(names, key=tensor_order)  # shards follow the fixed order
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    compile_full(src, q, tmp_path / "b", limit_mb, QC)
    for f in info["files"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_order_is_numeric_by_layer():
    names = ["lm_head.q_weight", "model.layers.10.x", "model.layers.2.x", "model.embed_tokens.weight"]
    assert sorted(names, key=tensor_order) == [
        "model.embed_tokens.weight", "model.layers.2.x", "model.layers.10.x", "lm_head.q_weight"]


def test_errors(tmp_path):
    src = _source(tmp_path / "src")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no \\*.safetensors"):
        compile_full(src, tmp_path / "empty", tmp_path / "out", 0, QC)
    q = _quantized(tmp_path / "q")
    save_file({"model.norm.weight": torch.ones(32).half()}, str(q / "dup.safetensors"))
    with pytest.raises(StepError, match="model.norm.weight"):
        compile_full(src, q, tmp_path / "out", 0, QC)
    with pytest.raises(InputError, match="shard_size_mb"):
        compile_full(src, q, tmp_path / "out", -1, QC)


def test_compiled_weights_are_readable_like_the_other_files(tmp_path):
    """safetensors writes 0600 files; a published model folder must not be owner-only."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    q = tmp_path / "q"
    q.mkdir()
    save_file({"model.norm.weight": torch.ones(8, dtype=torch.float16)}, str(q / "layer.safetensors"))
    out = tmp_path / "out"
    compile_full(src, q, out, 0, {"quant_method": "exl2"})
    mode = stat.S_IMODE(os.stat(out / "output.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(out / "tokenizer.json").st_mode)
