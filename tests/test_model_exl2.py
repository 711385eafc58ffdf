"""Loading EXL2 folders: quantized linears run through the kernels and match their dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from exl2build.errors import InputError
from exl2build.model.linear import EXL2Linear, FP16Linear
from exl2build.model.load import load_model

pytest.importorskip("exl2build._native")
from exl2build.quant.gptq import quantize_linear  # noqa: E402
from exl2build.quant.options import LinearOption  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _exl2_dir(tmp_path, **kw):
    """A tiny EXL2 folder (decoder linears + lm_head quantized) and the FP16 folder of its dequantized weights."""
    src = make_tiny_llama(tmp_path / "src", **kw)
    cfg = json.loads((src / "config.json").read_text())
    t = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    opt = LinearOption(32, (5, 4), (0.25, 0.75))
    quant, deq = {}, {}
    keys = [f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in LINEARS] + ["lm_head"]
    for key in keys:
        w = t.pop(f"{key}.weight")
        bias = t.pop(f"{key}.bias", None)
        X = torch.randn(256, w.shape[1], generator=g)
        qt, d = quantize_linear(w, X.T @ X, opt, bias=bias, name=key)
        quant.update(qt.tensors(key))
        deq[f"{key}.weight"] = d
        if bias is not None:
            deq[f"{key}.bias"] = bias
    out, ref = tmp_path / "exl2", tmp_path / "deq"
    for d, tensors in ((out, {**t, **quant}), (ref, {**t, **deq})):
        d.mkdir()
        save_file(tensors, str(d / "output.safetensors"))
        (d / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    (ref / "config.json").write_text(json.dumps(cfg))
    cfg["quantization_config"] = {"quant_method": "exl2", "version": "test", "bits": 4.25, "head_bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    return out, ref


@pytest.mark.parametrize("kw", [dict(), dict(arch="Qwen2ForCausalLM", qkv_bias=True)])
def test_exl2_model_matches_dequantized_fp16(tmp_path, kw):
    out, ref = _exl2_dir(tmp_path, **kw)
    if kw:
        for d in (out, ref):
            c = json.loads((d / "config.json").read_text())
            c.update(use_sliding_window=False)
            (d / "config.json").write_text(json.dumps(c))
    qm, qcfg = load_model(out)
    fm, _ = load_model(ref)
    assert qcfg.is_exl2
    assert isinstance(qm.layers[0].mlp.down_proj, EXL2Linear) and isinstance(qm.head, EXL2Linear)
    assert isinstance(fm.layers[0].mlp.down_proj, FP16Linear)
    ids = torch.randint(0, 32000, (1, 48), generator=torch.Generator().manual_seed(3))
    # Prefill (M > 32) uses the cached dequantized weight; decode (M = 1) the fused kernel.
    torch.testing.assert_close(qm(ids), fm(ids), atol=2e-3, rtol=2e-3)
    cache = qm.new_cache(1, 48)
    steps = torch.cat([qm(ids[:, i : i + 1], cache) for i in range(8)], 1)
    torch.testing.assert_close(steps, fm(ids[:, :8]), atol=2e-3, rtol=2e-3)


def test_exl2_missing_quant_tensor_is_named(tmp_path):
    out, _ = _exl2_dir(tmp_path)
    t = load_file(out / "output.safetensors")
    del t["model.layers.1.mlp.up_proj.q_scale"]
    save_file(t, str(out / "output.safetensors"))
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.q_scale.*output\.safetensors"):
        load_model(out)
