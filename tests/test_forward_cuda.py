"""The forward pass on CUDA: the fused f16 operations (native/cuda/forward.cu) against their
torch forms (kernels_ref), and a tiny model run with and without them.

Error bounds: rope_cache and silu_mul are bit-exact (they round where torch rounds); rms_norm
sums in another order, so within one f16 rounding (rtol 1e-3) of torch, its residual sum exact.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NEEDS_CUDA, make_tiny_llama

from exl2build import kernels, kernels_ref
from exl2build.model import forward
from exl2build.model.generate import generate
from exl2build.model.load import load_model

pytestmark = NEEDS_CUDA
DEV = "cuda"


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).half()


@pytest.mark.parametrize("shape", [(1, 4096), (3, 5, 576), (2, 100), (1, 1, 11008)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(shape, with_residual):
    x = rand(*shape, seed=1, scale=3.0)
    r = rand(*shape, seed=2) if with_residual else None
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).float()
    out, h = kernels.rms_norm(x, w, 1e-5, r)
    ref_out, ref_h = kernels_ref.rms_norm(x, w, 1e-5, r)
    assert torch.equal(h, ref_h)
    torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("B,T,H,Hkv,D", [(1, 1, 32, 32, 128), (2, 3, 8, 2, 64), (1, 7, 9, 3, 64), (1, 2, 4, 4, 256)])
@pytest.mark.parametrize("static", [False, True])
def test_rope_cache_bit_exact(B, T, H, Hkv, D, static):
    max_len = 16
    q, k, v = rand(B, T, H * D, seed=3), rand(B, T, Hkv * D, seed=4), rand(B, T, Hkv * D, seed=5)
    ang = torch.rand(T, D // 2, device=DEV) * 6.28
    cos = torch.cat((ang, ang), -1).cos().half()
    sin = torch.cat((-ang, ang), -1).sin().half()
    caches = [rand(B, Hkv, max_len, D, seed=6 + i) for i in range(2)]  # untouched slots must survive
    pos = torch.tensor([9, 2, 5, 14, 0, 11, 7][:T], device=DEV) if static else 4
    q1, kc1, vc1 = q.clone(), caches[0].clone(), caches[1].clone()
    kernels.rope_cache(q1, k, v, cos, sin, kc1, vc1, pos)
    q2, kc2, vc2 = q.clone(), caches[0].clone(), caches[1].clone()
    kernels_ref.rope_cache(q2, k, v, cos, sin, kc2, vc2, pos)
    assert torch.equal(q1, q2) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@pytest.mark.parametrize("n", [2, 11008, 3 * 1536 * 7])
def test_silu_mul_bit_exact(n):
    g, u = rand(n, seed=7, scale=4.0), rand(n, seed=8)
    assert torch.equal(kernels.silu_mul(g, u), kernels_ref.silu_mul(g, u))


@pytest.mark.parametrize("B,H,Hkv,D,L,pos", [
    (1, 32, 32, 128, 272, 0), (1, 32, 32, 128, 272, 17), (1, 32, 32, 128, 272, 271),
    (2, 9, 3, 64, 64, 40),  # GQA, SmolLM2's heads
    (1, 8, 2, 128, 4096, 3000),  # more keys per block than threads: several batches per block
    (3, 4, 4, 32, 20, 19),
    (1, 4, 2, 128, 100, 99),  # two query heads per block
    (2, 8, 2, 64, 300, 150),  # four query heads per block, two sequences
    (1, 6, 2, 96, 50, 33),  # a head_dim that leaves lanes of a key row idle
])
def test_decode_attention_matches_sdpa(B, H, Hkv, D, L, pos):
    q = rand(B, 1, H * D, seed=11)
    kc, vc = rand(B, Hkv, L, D, seed=12), rand(B, Hkv, L, D, seed=13)
    p = torch.tensor([pos], device=DEV)
    out = kernels.decode_attention(q, kc, vc, p)
    ref = kernels_ref.decode_attention(q, kc, vc, p)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=2e-3)
    kc[:, :, pos + 1 :] = float("nan")  # keys and values past the position must not be read
    vc[:, :, pos + 1 :] = float("nan")
    assert torch.equal(kernels.decode_attention(q, kc, vc, p), out)


@pytest.mark.parametrize("B,H,Hkv,D,L,pos", [
    (1, 32, 32, 128, 272, 0), (1, 32, 32, 128, 272, 17), (1, 32, 32, 128, 272, 271),
    (2, 9, 3, 64, 64, 40),  # GQA, SmolLM2's heads: three blocks per kv head, one stores
    (1, 8, 2, 128, 4096, 3000),
    (1, 4, 2, 128, 100, 99),
    (2, 8, 2, 64, 300, 150),
    (3, 4, 4, 32, 20, 19),
])
def test_decode_attention_with_rope_is_rope_cache_then_attention(B, H, Hkv, D, L, pos):
    """RoPE and the cache stores in the attention's launch: bit for bit rope_cache, then decode_attention."""
    q, k, v = rand(B, 1, H * D, seed=21), rand(B, 1, Hkv * D, seed=22), rand(B, 1, Hkv * D, seed=23)
    ang = torch.rand(1, D // 2, device=DEV) * 6.28
    cos = torch.cat((ang, ang), -1).cos().half()
    sin = torch.cat((-ang, ang), -1).sin().half()
    caches = [rand(B, Hkv, L, D, seed=24 + i) for i in range(2)]
    p = torch.tensor([pos], device=DEV)
    q1, kc1, vc1 = q.clone(), caches[0].clone(), caches[1].clone()
    kernels.rope_cache(q1, k, v, cos, sin, kc1, vc1, p)
    ref = kernels.decode_attention(q1, kc1, vc1, p)
    q2, kc2, vc2 = q.clone(), caches[0].clone(), caches[1].clone()
    kc2[:, :, pos] = float("nan")  # the new position must be stored, not read
    vc2[:, :, pos] = float("nan")
    out = kernels.decode_attention(q2, kc2, vc2, p, new=(k, v, cos, sin))
    assert torch.equal(out, ref)
    assert torch.equal(kc2, kc1) and torch.equal(vc2, vc1)
    assert torch.equal(q2, q)  # q stays unroped


def test_forward_ops_reject_what_they_cannot_run():
    with pytest.raises(ValueError, match="CUDA only"):
        kernels.silu_mul(torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        kernels.rms_norm(torch.zeros(2, 8, device=DEV), torch.ones(8, device=DEV), 1e-5)
    q = torch.zeros(1, 1, 64, dtype=torch.float16, device=DEV)
    kc = torch.zeros(1, 1, 4, 64, dtype=torch.float16, device=DEV)
    cs = torch.zeros(1, 64, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="do not fit a cache of 4"):
        kernels.rope_cache(q, q, q, cs, cs, kc, kc.clone(), 4)
    big = torch.zeros(1, 1, 4, 256, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="head_dim multiple of 8 up to 128"):
        kernels.decode_attention(torch.zeros(1, 1, 256, dtype=torch.float16, device=DEV), big, big,
                                 torch.zeros(1, dtype=torch.long, device=DEV))
    c24 = torch.zeros(1, 1, 4, 24, dtype=torch.float16, device=DEV)
    q24, cs24 = torch.zeros(1, 1, 24, dtype=torch.float16, device=DEV), torch.zeros(1, 24, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="multiple of 16, got 24"):
        kernels.decode_attention(q24, c24, c24.clone(), torch.zeros(1, dtype=torch.long, device=DEV),
                                 new=(q24, q24, cs24, cs24))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", layers=3, hidden=256, intermediate=512, heads=4,
                           kv_heads=2, vocab=512, tokenizer=False)
    model, _ = load_model(root, device=DEV)
    return model


def test_model_fused_and_torch_forms_agree(tiny_model, monkeypatch):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    for cache_len in (None, 64):  # no cache (evaluation), and a KV cache: prompt, then a 3-token chunk
        outs = []
        for fused in (True, False):
            monkeypatch.setattr(forward, "FUSED", fused)
            if cache_len is None:
                outs.append(tiny_model(ids).float())
            else:
                cache = tiny_model.new_cache(2, cache_len)
                a = tiny_model(ids[:, :37], cache)
                outs.append(torch.cat((a, tiny_model(ids[:, 37:], cache)), 1).float())
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(forward, "FUSED", True)
    full = tiny_model(ids).float()
    torch.testing.assert_close(outs[0], full, rtol=2e-2, atol=2e-2)  # cached chunks = one pass


def test_qwen2_with_qkv_bias_fused_and_torch_forms_agree(tmp_path, monkeypatch):
    """Biases on q/k/v (Qwen2) go through the fused path too: added before RoPE and the cache."""
    root = make_tiny_llama(tmp_path / "qwen", layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=256,
                           arch="Qwen2ForCausalLM", qkv_bias=True, tokenizer=False)
    model, _ = load_model(root, device=DEV)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(forward, "FUSED", fused)
        cache = model.new_cache(1, 16)
        outs.append(torch.cat([model(ids[:, :5], cache)] + [model(ids[:, t : t + 1], cache) for t in range(5, 9)], 1))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-2)


def test_graph_decode_matches_eager(tiny_model):
    prompt = list(range(1, 17))
    a = generate(tiny_model, None, prompt, 24, stop_at_eos=False, cuda_graph=True)
    b = generate(tiny_model, None, prompt, 24, stop_at_eos=False, cuda_graph=False)
    assert a.cuda_graph and not b.cuda_graph
    assert a.new_ids == b.new_ids


def test_sliding_window_on_cuda_matches_the_cpu_forward(tmp_path):
    """A Mistral-style 8-token window, shorter than the prompt and the generation: the CUDA paths
    (fused prefill, cached decode, the CUDA-graph step, which then leaves the decode-attention
    kernel to SDPA with a band mask) give the CPU forward's logits and tokens."""
    import json

    root = make_tiny_llama(tmp_path / "w", arch="MistralForCausalLM", layers=2, hidden=256, intermediate=512,
                           heads=4, kv_heads=2, vocab=512, tokenizer=False)
    c = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**c, "sliding_window": 8}))
    gpu, cfg = load_model(root, device=DEV)
    cpu, _ = load_model(root, device="cpu")
    assert cfg.sliding_windows == [8, 8]
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu(ids).float().cpu(), cpu(ids).float(), rtol=2e-2, atol=2e-2)
    prompt = ids[0, :12].tolist()
    a = generate(gpu, None, prompt, 20, stop_at_eos=False, cuda_graph=True)
    b = generate(gpu, None, prompt, 20, stop_at_eos=False, cuda_graph=False)
    assert a.cuda_graph and a.new_ids == b.new_ids
    ref = cpu(torch.tensor([a.ids[:-1]])).argmax(-1)[0, len(prompt) - 1:].tolist()  # greedy: each token the argmax
    assert sum(x == y for x, y in zip(ref, a.new_ids)) >= len(ref) - 2  # f16 against f32: a near tie may flip


def test_exl2_model_token_by_token_matches_one_pass(tmp_path):
    """EXL2 linears: decoding one token at a time (q/k/v and gate/up in grouped launches of the
    decode-sized kernel) gives the logits of one pass over the whole prompt (other kernels)."""
    from test_kernels_cuda import random_qtensor

    from exl2build.model.linear import EXL2Linear

    root = make_tiny_llama(tmp_path / "tiny", layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2,
                           vocab=512, tokenizer=False)
    model, _ = load_model(root, device=DEV)
    seed = 0
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, m in list(parent.named_children()):
                seed += 1
                layout = [(4, 128), (3, 64), (6, m.K - 192)] if m.K == 256 else [(4, 256), (5, 128), (2, m.K - 384)]
                parent.add_module(name, EXL2Linear(random_qtensor(m.K, m.N, layout, seed).to(DEV)))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    whole = model(ids).float()
    cache = model.new_cache(1, 16)
    steps = torch.cat([model(ids[:, t : t + 1], cache) for t in range(12)], 1).float()
    torch.testing.assert_close(steps, whole, rtol=2e-2, atol=2e-2)
