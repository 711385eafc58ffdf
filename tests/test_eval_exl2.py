"""Evaluation of real EXL2 folders (quantized by our GPTQ) against their FP16 source, then report and gates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file

from exl2build.errors import StepError
from exl2build.eval.evaluate import evaluate_model
from exl2build.eval.gates import check_gates
from exl2build.eval.report import baseline_entry, build_entry, write_report
from exl2build.quant.gptq import quantize_linear
from exl2build.quant.options import LinearOption

V = 512
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _quantize(src, out, bits, deq_dir=None):
    """EXL2 folder of `src` with every decoder linear at `bits` (group 32); optionally the FP16 folder of its
    dequantized weights (same model in plain linears)."""
    cfg = json.loads((src / "config.json").read_text())
    t = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    quant, deq = {}, {}
    for key in [f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in LINEARS]:
        w = t.pop(f"{key}.weight")
        X = torch.randn(256, w.shape[1], generator=g)
        qt, d = quantize_linear(w, X.T @ X, LinearOption(32, (bits,), (1.0,)), name=key)
        quant.update(qt.tensors(key))
        deq[f"{key}.weight"] = d
    for d, tensors, qcfg in ((out, {**t, **quant}, {"quant_method": "exl2", "version": "t", "bits": float(bits), "head_bits": 16}),
                             (deq_dir, {**t, **deq}, None)):
        if d is None:
            continue
        d.mkdir()
        save_file(tensors, str(d / "output.safetensors"))
        (d / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
        (d / "config.json").write_text(json.dumps({**cfg, **({"quantization_config": qcfg} if qcfg else {})}))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-exl2")
    src = make_tiny_llama(root / "fp16", vocab=V)
    builds = {b: _quantize(src, root / f"{b}.0bpw", b, root / f"deq{b}" if b == 4 else None) for b in (2, 4)}
    tokens = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(5))
    p = {"ctx": 64, "top_k": 64}
    base = evaluate_model(src, tokens, p, out_dir=root / "eval-fp16", device="cpu")
    evals = {b: evaluate_model(d, tokens, p, ref_dir=root / "eval-fp16", out_dir=root / f"eval-{b}", device="cpu")
             for b, d in builds.items()}
    return root, src, builds, base, evals, tokens


def test_exl2_eval_figures(built):
    root, _, _, base, evals, _ = built
    for b, r in evals.items():
        assert r["quantized"] and r["bits"] == float(b) and r["reference"] is None
        assert r["kld_mean"] > 0 and 0 < r["top1_agreement"] <= 1
        assert r["kld_median"] <= r["kld_p90"] <= r["kld_p99"] <= r["kld_p999"] <= r["kld_max"]
        assert r["ln_ppl_ratio"] == pytest.approx(math.log(r["ppl"] / base["ppl"]), abs=1e-6)
        assert not (root / f"eval-{b}" / "reference.safetensors").exists()
    # Fewer bits, more divergence.
    assert evals[2]["kld_mean"] > evals[4]["kld_mean"]
    assert evals[2]["top1_agreement"] < evals[4]["top1_agreement"]


def test_exl2_eval_matches_its_dequantized_fp16_twin(built):
    root, _, _, _, evals, tokens = built
    twin = evaluate_model(root / "deq4", tokens, {"ctx": 64}, device="cpu")
    assert twin["ppl"] == pytest.approx(evals[4]["ppl"], rel=1e-4)


def test_report_and_gates_from_real_evaluations(built, tmp_path):
    root, src, builds, base, evals, _ = built
    rows = [build_entry(float(b), builds[b], evals[b], bpw_decoder=float(b) + 0.16) for b in builds]
    rep = {"recipe": "tiny", "source": {"path": str(src)}, "baseline": baseline_entry(src, base), "builds": rows}
    out = write_report(tmp_path, rep)
    assert {p.name for p in out["plots"]} == {"ppl_vs_bpw.png", "kld_vs_bpw.png", "top1_vs_bpw.png"}
    r = json.loads(out["json"].read_text())
    assert [b["bpw_target"] for b in r["builds"]] == [2.0, 4.0]
    assert r["builds"][0]["size_bytes"] < r["builds"][1]["size_bytes"] < r["baseline"]["size_bytes"]
    assert r["eval"]["method"] == "windows" and r["eval"]["windows"] == 6
    loose = {"max_kld_mean": 10.0, "min_top1_agreement": 0.0}
    for b in rows:
        assert all(c["ok"] for c in check_gates(loose, b["bpw_target"], b, r["baseline"]))
    tight = {"max_kld_mean": {2.0: evals[2]["kld_mean"] / 2}}
    with pytest.raises(StepError, match=r"2.0 bpw.*kld_mean"):
        check_gates(tight, 2.0, rows[0], r["baseline"])


def test_dequant_cache_toggles_every_exl2_linear(built):
    from exl2build.model.linear import EXL2Linear, dequant_cache, dequant_cache_bytes
    from exl2build.model.load import load_model

    root, _, builds, _, evals, _ = built
    assert evals[4]["dequant_cache_bytes"] == 0  # CPU: the linears keep their own copies anyway
    model, _ = load_model(builds[4], "cpu")
    lins = [m for m in model.modules() if isinstance(m, EXL2Linear)]
    assert len(lins) == 2 * len(LINEARS)
    want = sum(m.K * m.N * 2 for m in lins)
    assert dequant_cache_bytes(model) == want
    assert dequant_cache(model, True) == want and all(m.keep_dequantized for m in lins)
    x = torch.randn(40, lins[0].K)
    lins[0](x)
    assert lins[0]._deq is not None
    assert dequant_cache(model, False) == 0
    assert not any(m.keep_dequantized for m in lins) and lins[0]._deq is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dequant_cache_on_cuda_gives_the_same_figures(built, monkeypatch):
    import exl2build.eval.evaluate as ev

    root, _, builds, _, _, tokens = built
    p = {"ctx": 64, "top_k": 64}
    cached = evaluate_model(builds[4], tokens, p, device="cuda")
    monkeypatch.setattr(ev, "DEQUANT_CACHE_SHARE", 0.0)
    plain = evaluate_model(builds[4], tokens, p, device="cuda")
    assert cached["dequant_cache_bytes"] > 0 and plain["dequant_cache_bytes"] == 0
    for k in ("ppl", "nll_mean", "top1_agreement"):
        if k in plain:
            assert cached[k] == plain[k], k
