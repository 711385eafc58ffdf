"""Evaluation math: windows, perplexity, KLD statistics, top-1, delta-p, against plain torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exl2build import kernels, kernels_ref
from exl2build.errors import ConfigError
from exl2build.eval import metrics
from exl2build.eval.metrics import Window, plan_windows
from exl2build.eval.reference import topk_logprobs

BACKENDS = [pytest.param(kernels, id="native"), pytest.param(kernels_ref, id="ref")]


# ---------------------------------------------------------------- windows


def test_windows_method_is_non_overlapping_and_drops_the_tail():
    w = plan_windows([10], ctx=4, method="windows")
    assert w == [Window(0, 0, 4, 1), Window(0, 4, 8, 5)]
    assert [x.scored for x in w] == [3, 3]


def test_sliding_default_scores_every_token_after_the_first_half_window_once():
    w = plan_windows([10], ctx=4, method="sliding")
    assert [(x.start, x.end, x.score_from) for x in w] == [(0, 4, 2), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [t for x in w for t in range(x.score_from, x.end)]
    assert scored == list(range(2, 10))


def test_sliding_with_stride_ctx_is_llama_cpp_chunking():
    w = plan_windows([12], ctx=4, method="sliding", stride=4)
    assert [(x.start, x.score_from, x.end) for x in w] == [(0, 2, 4), (4, 6, 8), (8, 10, 12)]


def test_windows_per_row_and_limit():
    w = plan_windows([8, 9], ctx=4, method="windows")
    assert [(x.row, x.start) for x in w] == [(0, 0), (0, 4), (1, 0), (1, 4)]
    assert len(plan_windows([8, 9], ctx=4, max_windows=3)) == 3
    assert plan_windows([3], ctx=4) == []


@pytest.mark.parametrize("kw", [dict(method="nope"), dict(method="sliding", stride=1), dict(method="sliding", stride=9),
                                dict(ctx=1)])
def test_bad_window_settings_name_the_key(kw):
    args = dict(ctx=8, method="windows") | kw
    with pytest.raises(ConfigError, match=r"eval\.(method|stride|ctx)"):
        plan_windows([100], **args)


# ---------------------------------------------------------------- statistics


def test_mean_and_err_known_values():
    m, e = metrics.mean_and_err([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert e == pytest.approx(math.sqrt(1.25 / 3))
    assert metrics.mean_and_err([2.0]) == (2.0, None)


def _random_case(T=300, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_logits = torch.randn(T, V, generator=g) * 3
    q_logits = p_logits + torch.randn(T, V, generator=g) * 0.7
    targets = torch.randint(0, V, (T,), generator=g)
    return p_logits, q_logits, targets


@pytest.mark.parametrize("k", BACKENDS)
def test_perplexity_matches_full_log_softmax(k):
    _, q, t = _random_case()
    nll = k.logit_stats(q, t)["nll"]
    direct = -torch.log_softmax(q.double(), -1).gather(1, t[:, None])[:, 0]
    f = metrics.perplexity(nll)
    assert f["ppl"] == pytest.approx(math.exp(direct.mean().item()), rel=1e-5)
    se = direct.std(unbiased=True).item() / math.sqrt(direct.numel())
    assert f["nll_err"] == pytest.approx(se, rel=1e-4)
    assert f["ppl_err"] == pytest.approx(f["ppl"] * se, rel=1e-4)
    assert f["tokens_scored"] == 300


def _exact_kld(p_logits, q_logits):
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("k", BACKENDS)
def test_topk_kld_with_k_equal_vocab_is_exact(k):
    p, q, t = _random_case()
    idx, logp = topk_logprobs(p, p.shape[1])
    kld = k.logit_stats(q, t, idx, logp)["kld"]
    torch.testing.assert_close(kld.double(), _exact_kld(p, q), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("k", BACKENDS)
@pytest.mark.parametrize("top", [1, 4, 32])
def test_topk_kld_is_a_lower_bound(k, top):
    p, q, t = _random_case()
    idx, logp = topk_logprobs(p, top)
    kld = k.logit_stats(q, t, idx, logp)["kld"].double()
    exact = _exact_kld(p, q)
    assert bool((kld <= exact + 1e-5).all())
    assert bool((kld >= -1e-6).all())
    if top == 32:  # most of the mass is in the top-32 of these peaked rows: close to exact on average
        assert kld.mean().item() > 0.5 * exact.mean().item()


def test_topk_logprobs_match_log_softmax_in_fp16():
    p, _, _ = _random_case(T=20, V=50)
    idx, logp = topk_logprobs(p.half(), 5)
    assert idx.dtype == torch.int32 and logp.dtype == torch.float32
    full = torch.log_softmax(p.half().float(), -1)
    torch.testing.assert_close(logp, full.gather(1, idx.long()), atol=1e-5, rtol=1e-5)
    assert bool((idx[:, 0].long() == p.half().float().argmax(-1)).all())


def test_kld_stats_match_numpy():
    x = torch.rand(1001, dtype=torch.float64) ** 3
    f = metrics.kld_stats(x)
    a = x.numpy()
    assert f["kld_mean"] == pytest.approx(a.mean())
    assert f["kld_median"] == pytest.approx(np.median(a))
    assert f["kld_p90"] == pytest.approx(np.quantile(a, 0.9))
    assert f["kld_p99"] == pytest.approx(torch.quantile(x, 0.99).item())
    assert f["kld_p999"] == pytest.approx(torch.quantile(x, 0.999).item())
    assert f["kld_max"] == pytest.approx(a.max())
    assert f["kld_err"] == pytest.approx(a.std() / math.sqrt(a.size - 1))


@pytest.mark.parametrize("k", BACKENDS)
def test_agreement_delta_p_and_ppl_ratio(k):
    p, q, t = _random_case()
    sp, sq = k.logit_stats(p, t), k.logit_stats(q, t)
    f = metrics.summarize(sq["nll"], sq["argmax"], None, sp["nll"], sp["argmax"])
    assert f["top1_agreement"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).double().mean().item())
    pp = torch.softmax(p.double(), -1).gather(1, t[:, None])[:, 0]
    pq = torch.softmax(q.double(), -1).gather(1, t[:, None])[:, 0]
    dp = pq - pp
    assert f["dp_mean"] == pytest.approx(dp.mean().item(), abs=1e-6)
    assert f["dp_rms"] == pytest.approx(dp.pow(2).mean().sqrt().item(), rel=1e-5)
    ppl_p, ppl_q = metrics.perplexity(sp["nll"])["ppl"], metrics.perplexity(sq["nll"])["ppl"]
    assert f["ln_ppl_ratio"] == pytest.approx(math.log(ppl_q / ppl_p), abs=1e-6)
    assert f["ppl_ratio"] == pytest.approx(ppl_q / ppl_p, rel=1e-6)
    assert f["ppl_ref"] == pytest.approx(ppl_p, rel=1e-6)
    assert "kld_mean" not in f
