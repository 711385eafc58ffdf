"""evaluate_model on tiny random models, checked against a direct full-vocabulary computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open

from exl2build.errors import ConfigError, InputError
from exl2build.eval.evaluate import EvalParams, evaluate_model
from exl2build.eval.metrics import plan_windows
from exl2build.eval.speed import measure_speed
from exl2build.model.load import load_model

V = 512  # small vocabulary so top_k = V (exact KLD) stays cheap


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    fp16 = make_tiny_llama(root / "fp16", vocab=V, seed=0)
    # "Quantized" stand-in: same shapes, weights perturbed (what matters here is a different model).
    other = make_tiny_llama(root / "other", vocab=V, seed=0)
    from safetensors.torch import load_file, save_file

    t = load_file(str(other / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    t = {k: (v.float() + 0.3 * v.float().std() * torch.randn(v.shape, generator=g)).half() if "proj" in k else v
         for k, v in t.items()}
    save_file(t, str(other / "model.safetensors"))
    return fp16, other


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(7))


def _direct(model_dir, tokens, ctx, method, stride=None, ref_dir=None):
    """Per-token NLL (and full KLD vs ref_dir's model) straight from model.forward + log_softmax."""
    model, _ = load_model(model_dir, "cpu")
    ref = load_model(ref_dir, "cpu")[0] if ref_dir else None
    nll, kld = [], []
    for w in plan_windows([tokens.numel()], ctx, method, stride):
        ids = tokens[w.start : w.end]
        j0 = w.score_from - w.start
        lq = torch.log_softmax(model(ids).double(), -1)[j0 - 1 : -1]
        nll.append(-lq.gather(1, ids[j0:, None])[:, 0])
        if ref is not None:
            lp = torch.log_softmax(ref(ids).double(), -1)[j0 - 1 : -1]
            kld.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(nll), (torch.cat(kld) if kld else None)


@pytest.mark.parametrize("method,stride", [("windows", None), ("sliding", None), ("sliding", 64)])
def test_perplexity_matches_direct_forward(models, tokens, tmp_path, method, stride):
    fp16, _ = models
    r = evaluate_model(fp16, tokens, {"ctx": 64, "method": method, "stride": stride, "chunk": 7}, out_dir=tmp_path,
                       device="cpu")
    nll, _ = _direct(fp16, tokens, 64, method, stride)
    assert r["tokens_scored"] == nll.numel()
    assert r["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    assert r["ppl_err"] == pytest.approx(r["ppl"] * nll.std().item() / math.sqrt(nll.numel()), rel=1e-3)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["ppl"] == r["ppl"] and saved["method"]["method"] == method
    assert saved["reference"] == "reference.safetensors" and not saved["quantized"]


def test_methods_differ_on_the_same_tokens(models, tokens):
    fp16, _ = models
    a = evaluate_model(fp16, tokens, {"ctx": 64, "method": "windows"}, device="cpu")
    b = evaluate_model(fp16, tokens, {"ctx": 64, "method": "sliding"}, device="cpu")
    assert a["tokens_scored"] == 4 * 63 and b["tokens_scored"] == 300 - 300 % 32 - 32
    assert a["ppl"] != b["ppl"]


def test_reference_file_is_compact_topk(models, tokens, tmp_path):
    fp16, _ = models
    evaluate_model(fp16, tokens, {"ctx": 64, "top_k": 5}, out_dir=tmp_path, device="cpu")
    with safe_open(str(tmp_path / "reference.safetensors"), "pt") as f:
        idx, logp, nll = f.get_tensor("topk_idx"), f.get_tensor("topk_logp"), f.get_tensor("nll")
    assert idx.shape == (4 * 63, 5) and idx.dtype == torch.int32
    assert logp.dtype == torch.float32 and bool((logp[:, :-1] >= logp[:, 1:]).all())
    direct, _ = _direct(fp16, tokens, 64, "windows")
    torch.testing.assert_close(nll.double(), direct, atol=1e-4, rtol=1e-4)


def test_fp16_against_itself_has_zero_kld(models, tokens, tmp_path):
    fp16, _ = models
    evaluate_model(fp16, tokens, {"ctx": 64}, out_dir=tmp_path / "ref", device="cpu")
    r = evaluate_model(fp16, tokens, {"ctx": 64}, ref_dir=tmp_path / "ref", out_dir=tmp_path / "self",
                       device="cpu", write_reference=False)
    assert abs(r["kld_mean"]) < 1e-5 and r["top1_agreement"] == 1.0
    assert abs(r["ln_ppl_ratio"]) < 1e-6 and abs(r["dp_rms"]) < 1e-6
    assert not (tmp_path / "self" / "reference.safetensors").exists()


@pytest.mark.parametrize("method", ["windows", "sliding"])
def test_kld_with_full_vocab_reference_is_exact(models, tokens, tmp_path, method):
    fp16, other = models
    p = {"ctx": 64, "method": method, "top_k": V}
    base = evaluate_model(fp16, tokens, p, out_dir=tmp_path / "ref", device="cpu")
    r = evaluate_model(other, tokens, p, ref_dir=tmp_path / "ref", device="cpu")
    nll, kld = _direct(other, tokens, 64, method, ref_dir=fp16)
    assert r["kld_mean"] == pytest.approx(kld.mean().item(), rel=1e-3)
    assert r["kld_max"] == pytest.approx(kld.max().item(), rel=1e-3)
    assert r["kld_p99"] == pytest.approx(torch.quantile(kld, 0.99).item(), rel=1e-3)
    assert r["ln_ppl_ratio"] == pytest.approx(math.log(r["ppl"] / base["ppl"]), abs=1e-6)
    assert 0.0 <= r["top1_agreement"] < 1.0


def test_small_top_k_gives_a_lower_kld(models, tokens, tmp_path):
    fp16, other = models
    evaluate_model(fp16, tokens, {"ctx": 64, "top_k": 4}, out_dir=tmp_path / "ref", device="cpu")
    r = evaluate_model(other, tokens, {"ctx": 64, "top_k": 4}, ref_dir=tmp_path / "ref", device="cpu")
    _, kld = _direct(other, tokens, 64, "windows", ref_dir=fp16)
    assert 0 < r["kld_mean"] <= kld.mean().item() + 1e-6


def test_reference_from_other_settings_is_refused(models, tokens, tmp_path):
    fp16, other = models
    evaluate_model(fp16, tokens, {"ctx": 64}, out_dir=tmp_path / "ref", device="cpu")
    with pytest.raises(InputError, match="other tokens or windows"):
        evaluate_model(other, tokens, {"ctx": 32}, ref_dir=tmp_path / "ref", device="cpu")
    with pytest.raises(InputError, match="no FP16 reference"):
        evaluate_model(other, tokens, {"ctx": 64}, ref_dir=tmp_path / "nothing", device="cpu")


def test_two_dimensional_tokens_and_bos(models, tmp_path):
    fp16, _ = models
    rows = torch.randint(3, V, (3, 40), generator=torch.Generator().manual_seed(3))
    r = evaluate_model(fp16, rows, {"ctx": 32, "bos": True}, device="cpu")
    assert r["method"]["windows"] == 3 and r["tokens_scored"] == 3 * 31
    model, _ = load_model(fp16, "cpu")
    ids = rows[:, :32].clone()
    ids[:, 0] = 1
    lq = torch.log_softmax(model(ids).double(), -1)[:, :-1]
    nll = -lq.gather(2, rows[:, 1:32, None])[..., 0]
    assert r["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)


def test_too_few_tokens_and_bad_params(models, tokens):
    fp16, _ = models
    with pytest.raises(InputError, match="eval.ctx = 2048"):
        evaluate_model(fp16, tokens, {"ctx": 2048}, device="cpu")
    with pytest.raises(ConfigError, match="unknown key"):
        EvalParams.from_dict({"ctxx": 3})
    with pytest.raises(ConfigError, match="eval.top_k"):
        EvalParams.from_dict({"top_k": 0})
    with pytest.raises(ConfigError, match="eval.speed"):
        EvalParams.from_dict({"speed": {"runz": 1}})


def test_progress_and_speed(models, tokens):
    fp16, _ = models
    seen = []
    r = evaluate_model(fp16, tokens, {"ctx": 64, "speed": {"prefill_tokens": 32, "decode_tokens": 4, "runs": 2}},
                       progress=lambda d, t, w: seen.append((d, t)), device="cpu")
    assert seen[:4] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and r["speed"]["device"].startswith("CPU")
    assert len(r["speed"]["decode_runs_tps"]) == 2


def test_speed_defaults_depend_on_the_device():
    from exl2build.eval.speed import CPU_DEFAULTS, GPU_DEFAULTS, SpeedParams

    p = SpeedParams.from_dict({"runs": 5})
    assert p.resolve("cpu").prefill_tokens == CPU_DEFAULTS["prefill_tokens"] and p.resolve("cpu").runs == 5
    assert p.resolve("cuda").decode_tokens == GPU_DEFAULTS["decode_tokens"] == 256
    with pytest.raises(ConfigError, match="eval.speed.runs"):
        SpeedParams.from_dict({"runs": 0})


def test_measure_speed_keys(models):
    model, _ = load_model(models[0], "cpu")
    s = measure_speed(model, {"prefill_tokens": 16, "decode_tokens": 3, "runs": 3, "warmup": 0})
    assert s["decode_tps"] == sorted(s["decode_runs_tps"])[1]
    assert s["prefill_tokens"] == 16 and s["decode_tokens"] == 3
