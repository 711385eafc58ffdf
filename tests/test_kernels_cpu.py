"""CPU kernels (exl2build.kernels) against the plain-torch spec (exl2build.kernels_ref)."""

from __future__ import annotations

import pytest
import torch

from exl2build import _native, kernels, kernels_ref
from exl2build.format.exl2 import build_qtensor

BITS = (2, 3, 4, 5, 6, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_codes(rows: int, n: int, bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (rows, n), generator=gen(seed), dtype=torch.int64).to(torch.uint8)


def hinv_block(g: int, seed: int) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of a random SPD matrix (what quant/ passes)."""
    x = torch.randn(g, 4 * g, generator=gen(seed), dtype=torch.float64)
    h = x @ x.T / (4 * g) + 0.05 * torch.eye(g, dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True).to(torch.float32)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,n", [(32, 32), (64, 8), (128, 96), (96, 40), (16 * 4, 33)])
def test_pack_codes_matches_reference_and_round_trips(bits, rows, n):
    if rows * bits % 32:
        pytest.skip("rows do not fill whole words")
    codes = random_codes(rows, n, bits, seed=bits * 1000 + rows + n)
    packed = kernels.pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows * bits // 32, n)
    assert torch.equal(packed, kernels_ref.pack_codes(codes, bits))
    assert torch.equal(kernels.unpack_codes(packed, bits, rows), codes)
    assert torch.equal(kernels_ref.unpack_codes(packed, bits, rows), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_codes_bit_layout(bits):
    # Value i of a column sits at bit offset bits*i of the stream, low bits first.
    rows = 32
    codes = torch.zeros(rows, 1, dtype=torch.uint8)
    codes[1, 0] = (1 << bits) - 1
    words = kernels.pack_codes(codes, bits)[:, 0].tolist()
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    assert stream == ((1 << bits) - 1) << bits


def test_pack_2bit_group_of_16_rows():
    codes = random_codes(16, 64, 2, seed=3)
    packed = kernels.pack_codes(codes, 2)
    assert packed.shape == (1, 64)
    assert torch.equal(kernels.unpack_codes(packed, 2, 16), codes)


@pytest.mark.parametrize("g,n", [(1, 8), (3, 64), (5, 1536)])
def test_pack_scales_matches_reference_and_round_trips(g, n):
    qscale = torch.randint(1, 17, (g, n), generator=gen(g * n), dtype=torch.int64).to(torch.uint8)
    packed = kernels.pack_scales(qscale)
    assert torch.equal(packed, kernels_ref.pack_scales(qscale))
    assert torch.equal(kernels.unpack_scales(packed, n), qscale)
    assert torch.equal(kernels_ref.unpack_scales(packed, n), qscale)
    assert torch.equal(kernels.unpack_scales(packed, n - 3), qscale[:, : n - 3])
    # stored value = s - 1 at bits 4*(i%8)
    assert (int(packed[0, 0]) & 0xF) == int(qscale[0, 0]) - 1


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,n", [(1, 7), (32, 64), (128, 200)])
def test_quantize_rows_bit_exact(bits, rows, n):
    w = torch.randn(rows, n, generator=gen(bits + rows + n)) * 0.05
    scale = torch.rand(n, generator=gen(n)) * 0.01 + 1e-4
    scale[0] = 0.0  # an underflowed fp16 scale gives the zero code
    codes, deq = kernels.quantize_rows(w, scale, bits)
    rc, rd = kernels_ref.quantize_rows(w, scale, bits)
    assert torch.equal(codes, rc) and torch.equal(deq, rd)
    assert int(codes.max()) < 1 << bits
    assert torch.all(codes[:, 0] == 1 << (bits - 1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,n", [(32, 64), (128, 96), (64, 33)])
def test_group_scale_search_bit_exact(bits, rows, n):
    w = torch.randn(rows, n, generator=gen(10 * bits + rows)) * 0.02
    w[:, 3] *= 10  # one loud column spreads the 4-bit scale codes
    qs, smax, scale = kernels.group_scale_search(w, bits)
    rqs, rsmax, rscale = kernels_ref.group_scale_search(w, bits)
    assert torch.equal(qs, rqs) and smax == rsmax and torch.equal(scale, rscale)
    assert int(qs.min()) >= 1 and int(qs.max()) == 16
    # The returned scales are exactly what the loader computes from (qscale, fp16 scale_max).
    assert float(torch.as_tensor(smax).half()) == smax
    assert torch.equal(scale, kernels_ref.scales_fp16(qs, torch.as_tensor(smax)))


@pytest.mark.parametrize("norm,p_steps", [(2.0, 11), (3.0, 5), (2.7, 7), (3.5, 1)])
def test_group_scale_search_other_norms(norm, p_steps):
    w = torch.randn(64, 48, generator=gen(int(norm * 10))) * 0.03
    got = kernels.group_scale_search(w, 4, 0.8, 1.1, p_steps, norm)
    ref = kernels_ref.group_scale_search(w, 4, 0.8, 1.1, p_steps, norm)
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1] and torch.equal(got[2], ref[2])


def test_group_scale_search_beats_plain_absmax():
    w = torch.randn(128, 64, generator=gen(7)) * 0.02
    qs, smax, scale = kernels.group_scale_search(w, 3)
    _, deq = kernels.quantize_rows(w, scale, 3)
    _, smax1, scale1 = kernels.group_scale_search(w, 3, 1.0, 1.0, 1)
    _, deq1 = kernels.quantize_rows(w, scale1, 3)
    assert ((w - deq).abs() ** 3.5).sum() <= ((w - deq1).abs() ** 3.5).sum()


def test_group_scale_search_zero_group():
    qs, smax, scale = kernels.group_scale_search(torch.zeros(32, 16), 4)
    assert torch.all(qs == 1) and smax == 0.0 and torch.all(scale == 0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g,n", [(32, 64), (128, 200), (64, 1)])
def test_gptq_group_bit_exact(bits, g, n):
    w = torch.randn(g, n, generator=gen(bits * g + n)) * 0.02
    _, _, scale = kernels.group_scale_search(w, bits)
    hinv = hinv_block(g, seed=g + bits)
    w_nat, w_ref = w.clone(), w.clone()
    codes, err = kernels.gptq_group(w_nat, hinv, scale, bits)
    rcodes, rerr = kernels_ref.gptq_group(w_ref, hinv, scale, bits)
    assert torch.equal(codes, rcodes)
    assert torch.equal(err, rerr)
    assert torch.equal(w_nat, w_ref)
    # w now holds the dequantized rows of the codes.
    assert torch.equal(w_nat, (codes.float() - (1 << (bits - 1))) * scale)


def test_gptq_group_takes_a_view_of_hinv():
    g, n = 32, 40
    full = hinv_block(64, seed=1)
    w = torch.randn(g, n, generator=gen(2)) * 0.02
    _, _, scale = kernels.group_scale_search(w, 4)
    a, b = w.clone(), w.clone()
    codes, _ = kernels.gptq_group(a, full[32:64, 32:64], scale, 4)
    rcodes, _ = kernels_ref.gptq_group(b, full[32:64, 32:64].contiguous(), scale, 4)
    assert torch.equal(codes, rcodes)


# ----------------------------------------------------------------------------- dequant and matmul


def mixed_qtensor(K: int, N: int, layout, seed: int, bias: bool = False):
    """A QTensor of random weights quantized group by group; layout = [(bits, rows), ...]."""
    assert sum(r for _, r in layout) == K
    w = torch.randn(K, N, generator=gen(seed)) * 0.02
    groups, k = [], 0
    for bits, rows in layout:
        qs, smax, scale = kernels.group_scale_search(w[k : k + rows].contiguous(), bits)
        codes, _ = kernels.quantize_rows(w[k : k + rows].contiguous(), scale, bits)
        groups.append((bits, codes, qs, smax))
        k += rows
    invperm = torch.argsort(torch.randperm(K, generator=gen(seed + 1))).to(torch.int32)
    b = (torch.randn(N, generator=gen(seed + 2)) * 0.1).half() if bias else None
    return build_qtensor(groups, invperm, N, b)


LAYOUTS = [
    (256, 96, [(8, 32), (4, 64), (2, 128), (2, 32)]),
    (320, 200, [(8, 64), (6, 64), (5, 64), (4, 64), (3, 64)]),
    (192, 33, [(4, 128), (2, 64)]),
    (128, 64, [(3, 128)]),
    (96, 8, [(6, 32), (5, 32), (2, 16), (2, 16)]),
]


@pytest.mark.parametrize("K,N,layout", LAYOUTS)
def test_dequant_matches_reference(K, N, layout):
    qt = mixed_qtensor(K, N, layout, seed=K + N)
    assert qt.n_pad % 32 == 0 and qt.n_pad >= N
    for dtype in (torch.float16, torch.float32):
        got = kernels.dequant(qt, dtype)
        ref = kernels_ref.dequant(qt, dtype)
        assert got.shape == (K, N) and got.dtype == dtype
        assert torch.equal(got, ref)


def test_dequant_row_order_is_original():
    qt = mixed_qtensor(64, 32, [(8, 64)], seed=5)
    w_perm = kernels_ref.dequant(qt, torch.float32)[qt.perm.long()]  # back to packed order
    codes = kernels.unpack_codes(qt.q_weight, 8, 64)[:, :32].float() - 128
    scale = kernels_ref.scales_fp16(kernels.unpack_scales(qt.q_scale, 32)[0], qt.q_scale_max[0])
    assert torch.equal(w_perm, codes * scale)


@pytest.mark.parametrize("K,N,layout", LAYOUTS)
@pytest.mark.parametrize("M", [1, 3, 32, 40])
def test_exl2_matmul_matches_reference(K, N, layout, M):
    qt = mixed_qtensor(K, N, layout, seed=3 * K + N)
    x = torch.randn(M, K, generator=gen(M))
    y = kernels.exl2_matmul(x, qt)
    ref = kernels_ref.exl2_matmul(x, qt)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    xh = x.half()
    yh = kernels.exl2_matmul(xh, qt)
    assert yh.dtype == torch.float16
    torch.testing.assert_close(yh, kernels_ref.exl2_matmul(xh, qt), rtol=2e-3, atol=2e-3)


def test_exl2_matmul_zero_rows():
    qt = mixed_qtensor(64, 32, [(4, 64)], seed=9)
    assert kernels.exl2_matmul(torch.zeros(0, 64), qt).shape == (0, 32)


# pair_factor of native/cuda/tc_decode.cuh: where the CUDA decoders leave code r (low half) and code
# r + 4 (high half) of each pair (1024 + F * q), (low, high) for pairs 0..3.
PAIR_FACTOR = {2: ((1, 1), (4, 4), (16, 16), (64, 64)), 3: ((16, 1), (16, 1), (64, 4), (16, 1)),
               4: ((1, 1), (16, 16), (1, 1), (16, 16)), 5: ((1, 1), (32, 32), (1, 1), (1, 1)),
               6: ((1, 1), (1, 1), (16, 16), (1, 1)), 8: ((1, 1),) * 4}


@pytest.mark.parametrize("K,N,layout", LAYOUTS + [(100, 40, [(8, 64), (8, 36)])])
def test_unit_tables_describe_every_row_once(K, N, layout):
    """The decode-sized CUDA kernel's tables: each unit names its words, rows, group and scale_max,
    and unit_perm maps each unit slot (in the kernels' K-slot order) to the row's input channel, with
    log2 of the slot's pair factor in bits 24-26."""
    qt = mixed_qtensor(K, N, layout, seed=K)
    meta, uperm, max_bits, widths = kernels.unit_tables(qt)
    assert max_bits == max(b for b, _ in layout)
    qg = qt.q_groups.long().tolist()
    smax_bits = qt.q_scale_max.view(torch.int16).long().tolist()
    units = []
    for g, (bits, k_row, rows) in enumerate(qt.group_rows()):
        for lu in range((rows + 31) // 32):
            units.append((g, bits, qg[2 * g + 1] + lu * bits, k_row + 32 * lu, min(32, rows - 32 * lu),
                          lu == (rows + 31) // 32 - 1))
    assert meta.shape == (len(units), 4) and meta.dtype == torch.int32
    assert uperm.shape == (32 * len(units),) and uperm.dtype == torch.int32
    seen = []
    perm = qt.perm.tolist()
    for u, (g, bits, word, k0, rows, last) in enumerate(units):
        x, y, z, w = meta[u].tolist()
        assert (x, y) == (word, k0)
        assert (z & 15, (z >> 4) & 63, (z >> 10) & 63, (z >> 16) & 1) == (bits, (rows * bits + 31) // 32, rows, last)
        assert (w & 0xFFFF, (w >> 16) & 0xFFFF) == (g, smax_bits[g] & 0xFFFF)
        for i in range(32):
            pos = (i >> 3) * 8 + (i & 3) * 2 + ((i >> 2) & 1)  # lane i // 8, pair i % 4, half (i // 4) % 2
            entry = uperm[32 * u + pos].item()
            got = entry & kernels.UNIT_PERM_CHANNEL if entry >= 0 else -1
            assert got == (perm[k0 + i] if i < rows else -1)
            if got >= 0:
                seen.append(got)
                # bits 24-26: log2 of the pair factor of slot position pos (half pos % 2 of pair (pos // 2) % 4)
                assert 1 << (entry >> 24) == PAIR_FACTOR[bits][(pos >> 1) & 3][pos & 1]
    assert sorted(seen) == list(range(K))
    # the unit widths, for the launcher's K split: host memory, and only where the widths differ
    if len({bits for _, bits, *_ in units}) > 1:
        assert widths.device.type == "cpu" and widths.tolist() == [bits for _, bits, *_ in units]
    else:
        assert widths is None


@pytest.mark.skipif(not getattr(_native, "built_with_cuda", False), reason="the CUDA decoders are not built")
def test_unit_perm_factors_match_the_cuda_decoders():
    """unit_tables packs log2 of each slot's pair factor for the decode-sized kernel; the factors are
    where the CUDA decoders (native/cuda/pair_factor.h, a host function: no GPU needed) leave the codes."""
    for bits, log2s in kernels._PAIR_LOG2.items():
        assert [tuple(_native.cuda.pair_factor(bits, r, h) for h in (0, 1)) for r in range(4)] == \
            [(1 << lo, 1 << hi) for lo, hi in log2s]
        assert [(1 << lo, 1 << hi) for lo, hi in log2s] == list(PAIR_FACTOR[bits])
    with pytest.raises(ValueError, match="bits"):
        _native.cuda.pair_factor(7, 0, 0)
    with pytest.raises(ValueError, match="h is"):
        _native.cuda.pair_factor(4, 0, 2)


def test_unit_tables_follow_a_replaced_permutation():
    qt = mixed_qtensor(64, 32, [(4, 64)], seed=2)
    first = kernels.unit_tables(qt)[1].clone()
    assert kernels.unit_tables(qt)[1] is kernels.unit_tables(qt)[1]  # cached
    qt.q_invperm = qt.q_invperm.flip(0).contiguous()
    again = kernels.unit_tables(qt)[1]
    assert not torch.equal(first, again)
    assert sorted((again & kernels.UNIT_PERM_CHANNEL).tolist()) == list(range(64))


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,V,k", [(1, 5, 2), (7, 1000, 8), (33, 3001, 32), (4, 2500, 0)])
def test_logit_stats_matches_reference(dtype, T, V, k):
    logits = (torch.randn(T, V, generator=gen(T + V)) * 4).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen(V), dtype=torch.int64)
    ref_idx = ref_logp = None
    if k:
        ref = torch.log_softmax(torch.randn(T, V, generator=gen(T)) * 4, dim=1)
        top = ref.topk(k, dim=1)
        ref_idx, ref_logp = top.indices.to(torch.int32).contiguous(), top.values.contiguous()
    got = kernels.logit_stats(logits, targets, ref_idx, ref_logp)
    exp = kernels_ref.logit_stats(logits, targets, ref_idx, ref_logp)
    torch.testing.assert_close(got["nll"], exp["nll"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["argmax"], exp["argmax"])
    if k:
        torch.testing.assert_close(got["kld"], exp["kld"], rtol=1e-4, atol=1e-5)
        assert torch.all(got["kld"] > -1e-6)
    else:
        assert "kld" not in got


def test_logit_stats_kld_zero_against_itself_and_ties_pick_first():
    logits = torch.randn(5, 700, generator=gen(1)) * 3
    logits[:, 10] = 50.0
    logits[:, 600] = 50.0  # a later tie: argmax keeps the first
    logp = torch.log_softmax(logits, dim=1)
    top = logp.topk(16, dim=1)
    st = kernels.logit_stats(logits, torch.zeros(5, dtype=torch.int64), top.indices.int().contiguous(), top.values.contiguous())
    assert torch.all(st["argmax"] == 10)
    assert st["kld"].abs().max() < 1e-5
    torch.testing.assert_close(st["nll"], -logp[:, 0])


# ----------------------------------------------------------------------------- validation


def test_bad_inputs_raise_value_error():
    codes = torch.zeros(32, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bit widths"):
        kernels.pack_codes(codes, 7)
    with pytest.raises(ValueError, match="dtype"):
        kernels.pack_codes(codes.int(), 4)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        kernels.pack_codes(torch.zeros(4, 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.pack_codes(torch.zeros(8, 32, dtype=torch.uint8).T, 4)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        kernels.pack_codes(torch.full((16, 8), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="1..16"):
        kernels.pack_scales(torch.zeros(1, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.pack_scales(torch.ones(1, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="words"):
        kernels.unpack_codes(torch.zeros(1, 8, dtype=torch.int32), 4, 9)
    w = torch.zeros(32, 16)
    with pytest.raises(ValueError, match="shape"):
        kernels.quantize_rows(w, torch.ones(15), 4)
    with pytest.raises(ValueError, match="dtype"):
        kernels.quantize_rows(w.double(), torch.ones(16), 4)
    with pytest.raises(ValueError, match="p_steps"):
        kernels.group_scale_search(w, 4, p_steps=0)
    with pytest.raises(ValueError, match="hinv"):
        kernels.gptq_group(w, torch.eye(16), torch.ones(16), 4)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gptq_group(torch.zeros(16, 32).T, torch.eye(32), torch.ones(16), 4)
    qt = mixed_qtensor(64, 32, [(4, 64)], seed=2)
    with pytest.raises(ValueError, match="K=64"):
        kernels.exl2_matmul(torch.zeros(1, 63), qt)
    with pytest.raises(ValueError, match="dtype"):
        kernels.exl2_matmul(torch.zeros(1, 64, dtype=torch.float64), qt)
    with pytest.raises(ValueError, match="dtype"):
        kernels.dequant(qt, torch.bfloat16)
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="targets"):
        kernels.logit_stats(logits, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="both"):
        kernels.logit_stats(logits, torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="ref_logp"):
        kernels.logit_stats(logits, torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 2))


def test_bad_qtensor_raises_value_error():
    qt = mixed_qtensor(64, 32, [(4, 32), (2, 32)], seed=4)
    qt.q_scale_max = qt.q_scale_max.float()
    with pytest.raises(ValueError, match="q_scale_max"):
        kernels.dequant(qt)
    qt = mixed_qtensor(64, 32, [(4, 32), (2, 32)], seed=4)
    qt.q_invperm = qt.q_invperm[:63].contiguous()
    with pytest.raises(ValueError, match="q_invperm"):
        kernels.dequant(qt)
    # Values a corrupt file could hold: each fails before any kernel reads with it.
    qt = mixed_qtensor(64, 32, [(4, 32), (2, 32)], seed=4)
    qt.q_invperm[3] = qt.q_invperm[4]
    with pytest.raises(ValueError, match="q_invperm: not a permutation"):
        kernels.exl2_matmul(torch.zeros(1, 64), qt)
    qt = mixed_qtensor(64, 32, [(4, 32), (2, 32)], seed=4)
    qt.q_groups[0] = 0
    with pytest.raises(ValueError, match=r"q_groups: bit widths \[0, 2\]"):
        kernels.dequant(qt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the mismatch")
def test_mixed_devices_raise_value_error():
    w = torch.zeros(32, 16)
    with pytest.raises(ValueError):
        kernels.quantize_rows(w, torch.ones(16, device="cuda"), 4)


def test_meta_device_is_rejected():
    with pytest.raises(ValueError, match="only cpu and cuda"):
        kernels.pack_codes(torch.zeros(32, 8, dtype=torch.uint8, device="meta"), 4)


def test_backend_info():
    info = kernels.backend_info()
    assert isinstance(info["built_with_cuda"], bool) and info["cpu_threads"] >= 1


def test_fp16_scale_and_rounding_across_magnitudes():
    # 8-bit groups whose q_scale_max spans subnormal fp16 factors up to overflow: dequant to
    # f16 must round (q - 128) * scale exactly as torch's .half() does (nearest even, inf).
    G, N = 64, 32
    smax = torch.logspace(-7, 4.8, G, dtype=torch.float64).to(torch.float16)
    qscale = torch.randint(1, 17, (G, N), generator=gen(11), dtype=torch.int64).to(torch.uint8)
    codes = torch.randint(0, 256, (G * 32, N), generator=gen(12), dtype=torch.int64).to(torch.uint8)
    groups = [(8, codes[32 * g : 32 * g + 32], qscale[g], float(smax[g])) for g in range(G)]
    qt = build_qtensor(groups, torch.arange(G * 32, dtype=torch.int32), N)
    got = kernels.dequant(qt, torch.float16)
    assert torch.isinf(got).any() and (got.abs() < 6.1e-5).logical_and(got != 0).any()
    assert torch.equal(got, kernels_ref.dequant(qt, torch.float16))
    assert torch.equal(kernels.dequant(qt, torch.float32), kernels_ref.dequant(qt, torch.float32))


def test_fp16_conversions_exhaustive_through_matmul():
    # W = identity (8-bit code 129, scale exactly 1): y = x @ W returns every finite fp16
    # value unchanged, through fp16 -> f32 (input) and f32 -> fp16 (output).
    n = 64
    codes = torch.full((n, n), 128, dtype=torch.uint8)
    codes.fill_diagonal_(129)
    qt = build_qtensor([(8, codes, torch.full((n,), 16, dtype=torch.uint8), 1.0)], torch.arange(n, dtype=torch.int32), n)
    assert torch.equal(kernels.dequant(qt), torch.eye(n, dtype=torch.float16))
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[torch.isfinite(halves) & (halves.view(torch.int16) != -(1 << 15))]  # -0 sums to +0
    x = torch.cat([halves, torch.zeros((-len(halves)) % n, dtype=torch.float16)]).reshape(-1, n)
    for rows in x.split(32):
        rows = rows.contiguous()
        assert torch.equal(kernels.exl2_matmul(rows, qt).view(torch.int16), rows.view(torch.int16))
        assert torch.equal(kernels.exl2_matmul(rows.float(), qt), rows.float())


@pytest.mark.parametrize("M,K,N,cuda_f16,expect", [
    (33, 64, 64, False, True), (33, 64, 64, True, True),  # above the fused kernels' rows: always
    (32, 64, 64, False, False), (32, 4096, 4096, False, False),  # CPU and f32: fused up to 32 rows
    (32, 4096, 4096, True, True), (17, 4096, 14336, True, True), (17, 8192, 28672, True, True),
    (16, 4096, 14336, True, False), (16, 14336, 4096, True, False), (8, 8192, 28672, True, False),
    (16, 4096, 4096, True, True), (9, 4096, 4096, True, True), (8, 4096, 4096, True, False),
    (32, 2048, 4096, True, False), (1, 8192, 28672, True, False),  # small linears, one token: fused
])
def test_uses_dequant_decisions(M, K, N, cuda_f16, expect):
    """Which products exl2_matmul computes as dequant + torch.matmul (the measured crossovers)."""
    assert kernels.uses_dequant(M, K, N, cuda_f16) is expect


# An H200's figures (cudaDevAttr...: SMs, shared memory per block opt-in, per SM, reserved per block).
H200 = (132, 232448, 233472, 1024)


def _plan(lins, M, figures=H200, warps=0, k_splits=0, k_warps=0):
    return _native.cuda.gemv_plan(lins, M, *figures, warps, k_splits, k_warps)


needs_cuda_build = pytest.mark.skipif(not getattr(_native, "built_with_cuda", False),
                                      reason="the CUDA launchers are not built")


@needs_cuda_build
@pytest.mark.parametrize("lins, M, want", [
    # (n_pad, 32-row units, largest bit width) per linear; the choices behind benchmarks/RESULTS.md's sweeps
    ([(4096, 128, 4)], 1, dict(ks=12, kw=2)),    # 4096x4096: 2 warps along K over 12 splits (session 6)
    ([(14336, 128, 4)], 1, dict(ks=8, kw=1)),    # 4096x14336
    ([(28672, 256, 4)], 1, dict(ks=4, kw=1)),    # 8192x28672
    ([(14336, 128, 4)], 8, dict(ks=8, kw=1)),    # 448 blocks, 4 per SM fit: the default stays
    ([(14336, 128, 6)], 8, dict(ks=4, kw=1)),    # 3 per SM fit (396 < 448 blocks): 4 splits (session 8)
    ([(28672, 256, 4)], 8, dict(ks=2, kw=1)),    # 8192x28672 4.0 bpw: 2 splits (session 8)
    ([(28672, 256, 6)], 8, dict(ks=4, kw=1)),    # no fit from 2 up: the default stays
    ([(4096, 448, 4)], 8, dict(ks=16, kw=1)),    # 14336x4096: 256 blocks fit, 28 units a warp
    ([(4096, 128, 6)], 8, dict(ks=8, kw=2)),     # 4096x4096: 8 units a warp, 2 warps along K (session 16)
    ([(4096, 128, 3)], 2, dict(ks=8, kw=2)),
    ([(4096, 128, 4), (1024, 128, 4), (1024, 128, 4)], 8, dict(ks=8, kw=2)),  # q, k, v of a GQA model
    ([(14336, 128, 4)], 16, dict(ks=8, kw=1, NT=2)),  # the rule stops at 8 tokens
    ([(4096, 128, 4), (1024, 128, 4), (1024, 128, 4)], 1, dict(ks=12, kw=2)),  # q, k, v in one launch
])
def test_gemv_plan_choices(lins, M, want):
    """The decode-sized kernel's launch shape for an H200 (gemv_plan.h, host code: no GPU needed)."""
    plan = _plan(lins, M)
    assert plan is not None
    assert {k: plan[k] for k in want} == want
    assert plan["W"] == 4 and plan["smem"] <= H200[1]
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    assert plan["blocks"] == sum(cdiv(cdiv(n, 64), 4 // plan["kw"]) for n, _, _ in lins)  # 64 columns per warp


@needs_cuda_build
def test_gemv_plan_declines():
    """None where the kernel does not apply: the launcher then takes another kernel."""
    one = [(4096, 128, 4)]
    assert _plan(one, 0) is None and _plan(one, 33) is None
    assert _plan([(4096, 128, 9)], 1) is None and _plan([(4096, 0, 4)], 1) is None
    assert _plan(one, 1, warps=2, k_warps=4) is None           # more warps along K than the block has
    assert _plan([(4096, 448, 8)], 32, figures=(132, 20000, 233472, 1024)) is None  # no split fits the shared memory
    assert _plan(one, 1, k_splits=3)["ks"] == 3               # explicit choices are kept
    with pytest.raises(ValueError, match="1 to 3 linears"):
        _plan(one * 4, 1)


@needs_cuda_build
@pytest.mark.parametrize("ks", [1, 2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("widths", [[3] * 64 + [2] * 64, [6] * 5 + [4] * 100 + [3] * 23, [2] * 10 + [8] * 3, [4] * 40])
def test_gemv_split_balances_unit_costs(ks, widths):
    """The decode-sized kernel's K split (gemv_plan.h gemv_split, host code): contiguous, covering,
    no split empty while there are units for all; by cost (bits + C) within one unit's cost of the
    equal share; equal unit counts with a negative C (and for one width either way)."""
    C = _native.cuda.gemv_cost_c
    U = len(widths)
    b = _native.cuda.gemv_split(widths, ks, C)
    assert b[0] == 0 and b[-1] == U and len(b) == ks + 1
    assert all(lo < hi for lo, hi in zip(b, b[1:])) if U >= ks else all(lo <= hi for lo, hi in zip(b, b[1:]))
    uniform = [U * r // ks for r in range(ks + 1)]
    assert _native.cuda.gemv_split(widths, ks, -1) == uniform
    if len(set(widths)) == 1:
        assert b == uniform
        return
    cost = [w + C for w in widths]
    share = sum(cost) / ks
    for r in range(ks):
        assert abs(sum(cost[b[r]:b[r + 1]]) - share) <= max(cost) + 1e-9
    # no worse than equal unit counts at the most expensive split
    worst = lambda bounds: max(sum(cost[bounds[r]:bounds[r + 1]]) for r in range(ks))  # noqa: E731
    assert worst(b) <= worst(uniform)


@needs_cuda_build
def test_gemv_split_weights_3_bit_above_2_bit():
    """Half 3-bit then half 2-bit units (the 2.5 bpw layout of benchmarks/kernels.py) over 4 splits:
    the 3-bit splits get fewer units, the 2-bit ones more."""
    b = _native.cuda.gemv_split([3] * 128 + [2] * 128, 4, _native.cuda.gemv_cost_c)
    counts = [hi - lo for lo, hi in zip(b, b[1:])]
    assert counts[0] < 64 and counts[3] > 64 and sum(counts) == 256
    with pytest.raises(ValueError, match="ks"):
        _native.cuda.gemv_split([4] * 8, 17, 5)
