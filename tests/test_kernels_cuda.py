"""CUDA kernels (exl2build._native.cuda, via exl2build.kernels and directly) against the
plain-torch spec (exl2build.kernels_ref).

Error bounds per kernel:
- pack/unpack codes and scales, quantize_rows, group_scale_search, gptq_group, dequant:
  bit-exact (torch.equal), the arithmetic follows the reference operation by operation.
- exl2_matmul (SIMT, tensor-core and decode-sized kernels): f32 accumulation, the scales
  applied per group: relative Frobenius error
  <= 1e-5 against x.float() @ dequant_f32 for f32 I/O; for f16 I/O <= 2e-3 and elementwise
  within one f16 rounding of the output plus 1e-3 * max|y|.
- logit_stats: nll within 1e-5 (abs+rel), argmax exact, kld within 1e-4 rel / 1e-5 abs.

Outputs are handed to the native kernels pre-filled with poison (NaN for floats, and two
different byte patterns for integers) so that an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NEEDS_CUDA

from exl2build import _native, kernels, kernels_ref
from exl2build.format.exl2 import build_qtensor

pytestmark = NEEDS_CUDA

BITS = (2, 3, 4, 5, 6, 8)
DEV = "cuda"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def native(fn: str, *args):
    getattr(_native.cuda, fn)(*args, stream())
    torch.cuda.synchronize()


def poisoned(shape, dtype, value):
    return torch.full(shape, value, dtype=dtype, device=DEV)


INT_POISONS = (0xFF, 0x5A)


def random_codes(rows: int, n: int, bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (rows, n), generator=gen(seed), dtype=torch.int64).to(torch.uint8)


def hinv_block(g: int, seed: int) -> torch.Tensor:
    x = torch.randn(g, 4 * g, generator=gen(seed), dtype=torch.float64)
    h = x @ x.T / (4 * g) + 0.05 * torch.eye(g, dtype=torch.float64)
    # .contiguous(): cholesky(upper=True) returns a transposed view, and the raw pointer
    # handed to the native kernel must be row-major.
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True).to(torch.float32).contiguous()


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,n", [(32, 32), (64, 8), (128, 96), (96, 40), (64, 33), (256, 1000)])
def test_pack_unpack_codes_bit_exact(bits, rows, n):
    if rows * bits % 32:
        pytest.skip("rows do not fill whole words")
    codes = random_codes(rows, n, bits, seed=bits * 1000 + rows + n)
    ref = kernels_ref.pack_codes(codes, bits)
    cd = codes.to(DEV)
    for p in INT_POISONS:
        out = poisoned(ref.shape, torch.int32, p * 0x01010101 - (1 << 32) * (p >= 0x80))
        native("pack_codes", cd.data_ptr(), out.data_ptr(), rows, n, bits)
        assert torch.equal(out.cpu(), ref)
        back = poisoned((rows, n), torch.uint8, p)
        native("unpack_codes", out.data_ptr(), back.data_ptr(), rows, n, bits)
        assert torch.equal(back.cpu(), codes)
    # through kernels.py too
    assert torch.equal(kernels.pack_codes(cd, bits).cpu(), ref)
    assert torch.equal(kernels.unpack_codes(ref.to(DEV), bits, rows).cpu(), codes)


def test_unpack_codes_2bit_16_rows():
    codes = random_codes(16, 64, 2, seed=3)
    packed = kernels_ref.pack_codes(codes, 2)
    assert torch.equal(kernels.unpack_codes(packed.to(DEV), 2, 16).cpu(), codes)


@pytest.mark.parametrize("g,n", [(1, 8), (3, 64), (5, 1536), (7, 40)])
def test_pack_unpack_scales_bit_exact(g, n):
    qscale = torch.randint(1, 17, (g, n), generator=gen(g * n), dtype=torch.int64).to(torch.uint8)
    ref = kernels_ref.pack_scales(qscale)
    qd = qscale.to(DEV)
    for p in INT_POISONS:
        out = poisoned(ref.shape, torch.int32, p)
        native("pack_scales", qd.data_ptr(), out.data_ptr(), g, n)
        assert torch.equal(out.cpu(), ref)
        back = poisoned((g, n), torch.uint8, p)
        native("unpack_scales", out.data_ptr(), back.data_ptr(), g, n)
        assert torch.equal(back.cpu(), qscale)
    assert torch.equal(kernels.unpack_scales(ref.to(DEV), n - 3).cpu(), qscale[:, : n - 3])


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,n", [(1, 7), (32, 64), (128, 200), (64, 4133)])
def test_quantize_rows_bit_exact(bits, rows, n):
    w = torch.randn(rows, n, generator=gen(bits + rows + n)) * 0.05
    scale = torch.rand(n, generator=gen(n)) * 0.01 + 1e-4
    scale[0] = 0.0  # an underflowed fp16 scale gives the zero code
    rc, rd = kernels_ref.quantize_rows(w, scale, bits)
    wd, sd = w.to(DEV), scale.to(DEV)
    for p in INT_POISONS:
        codes = poisoned((rows, n), torch.uint8, p)
        deq = poisoned((rows, n), torch.float32, float("nan"))
        native("quantize_rows", wd.data_ptr(), sd.data_ptr(), codes.data_ptr(), deq.data_ptr(), rows, n, bits)
        assert torch.equal(codes.cpu(), rc) and torch.equal(deq.cpu(), rd)


def _gss_native(w: torch.Tensor, bits, p_min=0.70, p_max=1.20, p_steps=97, norm=3.5, poison=0xFF):
    R, N = w.shape
    wd = w.to(DEV)
    qs = poisoned((N,), torch.uint8, poison)
    scale = poisoned((N,), torch.float32, float("nan"))
    smax = poisoned((1,), torch.float32, float("nan"))
    native("group_scale_search", wd.data_ptr(), R, N, bits, p_min, p_max, p_steps, norm, qs.data_ptr(),
           scale.data_ptr(), smax.data_ptr())
    return qs.cpu(), float(smax.item()), scale.cpu()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,n", [(32, 64), (128, 96), (64, 33), (128, 700)])
def test_group_scale_search_bit_exact(bits, rows, n):
    w = torch.randn(rows, n, generator=gen(10 * bits + rows)) * 0.02
    w[:, 3] *= 10  # one loud column spreads the 4-bit scale codes
    rqs, rsmax, rscale = kernels_ref.group_scale_search(w, bits)
    for p in INT_POISONS:
        qs, smax, scale = _gss_native(w, bits, poison=p)
        assert torch.equal(qs, rqs) and smax == rsmax and torch.equal(scale, rscale)
    qs, smax, scale = kernels.group_scale_search(w.to(DEV), bits)
    assert torch.equal(qs.cpu(), rqs) and smax == rsmax and torch.equal(scale.cpu(), rscale)


@pytest.mark.parametrize("norm,p_steps", [(2.0, 11), (3.0, 5), (2.7, 7), (3.5, 1)])
def test_group_scale_search_other_norms(norm, p_steps):
    w = torch.randn(64, 48, generator=gen(int(norm * 10))) * 0.03
    got = _gss_native(w, 4, 0.8, 1.1, p_steps, norm)
    ref = kernels_ref.group_scale_search(w, 4, 0.8, 1.1, p_steps, norm)
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1] and torch.equal(got[2], ref[2])


def test_group_scale_search_zero_group():
    qs, smax, scale = _gss_native(torch.zeros(32, 16), 4)
    assert torch.all(qs == 1) and smax == 0.0 and torch.all(scale == 0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g,n", [(32, 64), (128, 200), (64, 1), (128, 1000), (16, 40)])
def test_gptq_group_bit_exact(bits, g, n):
    w = torch.randn(g, n, generator=gen(bits * g + n)) * 0.02
    _, _, scale = kernels_ref.group_scale_search(w, bits, p_steps=9)
    hinv = hinv_block(g, seed=g + bits)
    w_ref = w.clone()
    rcodes, rerr = kernels_ref.gptq_group(w_ref, hinv, scale, bits)
    hd, sd = hinv.to(DEV), scale.to(DEV)
    for p in INT_POISONS:
        wd = w.to(DEV)
        codes = poisoned((g, n), torch.uint8, p)
        err = poisoned((g, n), torch.float32, float("nan"))
        native("gptq_group", wd.data_ptr(), hd.data_ptr(), sd.data_ptr(), codes.data_ptr(), err.data_ptr(), g, n, bits)
        assert torch.equal(codes.cpu(), rcodes)
        assert torch.equal(err.cpu(), rerr)
        assert torch.equal(wd.cpu(), w_ref)
    wd = w.to(DEV)
    codes, err = kernels.gptq_group(wd, hd, sd, bits)
    assert torch.equal(codes.cpu(), rcodes) and torch.equal(wd.cpu(), w_ref)


def test_gptq_group_too_large_raises():
    with pytest.raises(RuntimeError, match="gptq_group"):
        _native.cuda.gptq_group(0, 0, 0, 0, 0, 100000, 32, 4, stream())


# ----------------------------------------------------------------------------- dequant and matmul


def random_qtensor(K: int, N: int, layout, seed: int):
    """A QTensor (on CPU) of random codes, scale codes and scale maxima; layout = [(bits, rows)]."""
    assert sum(r for _, r in layout) == K
    g = gen(seed)
    groups = []
    for bits, rows in layout:
        codes = torch.randint(0, 1 << bits, (rows, N), generator=g).to(torch.uint8)
        qs = torch.randint(1, 17, (N,), generator=g).to(torch.uint8)
        smax = float(torch.tensor(0.02 / (1 << (bits - 1)) * (0.5 + torch.rand(1, generator=g).item())).half())
        groups.append((bits, codes, qs, smax))
    invperm = torch.argsort(torch.randperm(K, generator=gen(seed + 1))).to(torch.int32)
    return build_qtensor(groups, invperm, N)


LAYOUTS = [
    (256, 96, [(8, 32), (4, 64), (2, 128), (2, 32)]),
    (320, 200, [(8, 64), (6, 64), (5, 64), (4, 64), (3, 64)]),
    (192, 33, [(4, 128), (2, 64)]),
    (128, 64, [(3, 128)]),
    (96, 8, [(6, 32), (5, 32), (2, 16), (2, 16)]),
    (112, 40, [(4, 64), (2, 48)]),
    (1024, 1000, [(8, 128), (6, 128), (5, 128), (4, 256), (3, 256), (2, 128)]),
    (4096, 352, [(4, 128)] * 32),
    (100, 72, [(8, 64), (8, 36)]),  # K not a multiple of 8: x rows copied element by element
]


def qt_args(qt):
    return [qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), qt.q_scale_max.data_ptr(), qt.q_groups.data_ptr()]


@pytest.mark.parametrize("K,N,layout", LAYOUTS)
def test_dequant_bit_exact(K, N, layout):
    qt = random_qtensor(K, N, layout, seed=K + N)
    qd = qt.to(DEV)
    for dtype in (torch.float16, torch.float32):
        ref = kernels_ref.dequant(qt, dtype)
        out = poisoned((K, N), dtype, float("nan"))
        native("dequant", *qt_args(qd), qd.q_invperm.data_ptr(), out.data_ptr(), K, N, qd.n_pad, qd.num_groups,
               dtype == torch.float16)
        assert torch.equal(out.cpu(), ref)
    assert torch.equal(kernels.dequant(qd).cpu(), kernels_ref.dequant(qt))


def _matmul_native(x, qd, M, cfg=None):
    f16 = x.dtype == torch.float16
    y = poisoned((M, qd.N), x.dtype, float("nan"))
    args = [x.data_ptr(), *qt_args(qd), qd.perm.data_ptr(), y.data_ptr(), M, qd.K, qd.N, qd.n_pad, qd.num_groups, f16]
    if cfg is None:
        native("exl2_matmul", *args)
    else:
        _native.cuda.exl2_matmul_cfg(*args, stream(), *cfg)
        torch.cuda.synchronize()
    return y


def _check_matmul(y, x, w32, f16):
    ref = x.double().cpu() @ w32.double()
    yc = y.cpu().double()
    assert torch.isfinite(yc).all(), "unwritten (NaN) outputs"
    rel = ((yc - ref).norm() / ref.norm()).item()
    if f16:
        assert rel <= 2e-3, rel
        tol = ref.abs() * 2.0**-10 + 1e-3 * ref.abs().max()
        assert torch.all((yc - ref).abs() <= tol)
    else:
        assert rel <= 1e-5, rel


@pytest.mark.parametrize("K,N,layout", LAYOUTS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 32])
def test_exl2_matmul_matches_reference(K, N, layout, M):
    qt = random_qtensor(K, N, layout, seed=3 * K + N)
    qd = qt.to(DEV)
    w32 = kernels_ref.dequant(qt, torch.float32)
    x = torch.randn(M, K, generator=gen(M + K)).to(DEV)
    _check_matmul(_matmul_native(x, qd, M), x, w32, False)
    xh = x.half()
    yh = _matmul_native(xh, qd, M)
    _check_matmul(yh, xh, w32, True)
    # kernels.py dispatch: the same (tensor-core) kernel where the decode-sized one does not apply
    # (on these small linears: M in 2..8 and 17..32, or any M before sm_90)
    yk = kernels.exl2_matmul(xh, qd)
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    if sm90 and kernels._gemv_applies(xh, N):
        _check_matmul(yk, xh, w32, True)
    else:
        assert torch.equal(yk, yh)


@pytest.mark.parametrize("M", [8, 12, 20, 32])
def test_exl2_matmul_dequant_path_at_few_rows(M):
    """On a 4096x4096 linear exl2_matmul multiplies 9-32 rows as dequant + torch.matmul (exactly
    that product) and 8 rows with a fused kernel (within the fused kernels' bound)."""
    K = N = 4096
    qt = random_qtensor(K, N, [(4, 128)] * 20 + [(3, 128)] * 12, seed=77)
    qd = qt.to(DEV)
    xh = torch.randn(M, K, generator=gen(M + 7)).half().to(DEV)
    y = kernels.exl2_matmul(xh, qd)
    assert kernels.uses_dequant(M, K, N, True) is (M > 8)
    if M > 8:
        assert torch.equal(y, torch.matmul(xh, kernels.dequant(qd)))
        ys = kernels.exl2_matmul_group(xh, [qd, qd])
        assert all(torch.equal(a, y) for a in ys)
    else:
        _check_matmul(y, xh, kernels_ref.dequant(qt, torch.float32), True)


_SHAPES_QT = {}


def _launch_shapes_qtensor():
    if not _SHAPES_QT:
        K, N, layout = 1024, 1000, [(8, 128), (6, 128), (5, 128), (4, 224), (3, 256), (2, 112), (2, 48)]
        qt = random_qtensor(K, N, layout, seed=11)
        _SHAPES_QT["qt"] = (qt, kernels_ref.dequant(qt, torch.float32))
    return _SHAPES_QT["qt"]


@pytest.mark.parametrize("cpt", [1, 2])
@pytest.mark.parametrize("ks", [1, 2, 3, 8])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("flags", [0, 1, 2, 4])
def test_exl2_matmul_launch_shapes(cpt, ks, M, flags):
    """Every forced launch shape (columns per thread, K splits over a cluster, load pipeline)
    computes the same product, deterministically."""
    qt, w32 = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    x = torch.randn(M, qt.K, generator=gen(5)).to(DEV)
    y = _matmul_native(x, qd, M, (cpt, ks, flags))
    _check_matmul(y, x, w32, False)
    y2 = _matmul_native(x, qd, M, (cpt, ks, flags))
    assert torch.equal(y, y2), "not deterministic"


@pytest.mark.parametrize("K,N,layout", LAYOUTS)
def test_dequant_units_bit_exact(K, N, layout):
    """The fp16 unit-decoding dequantizer (the large-M path) equals the reference bit for bit."""
    qt = random_qtensor(K, N, layout, seed=K + N)
    qd = qt.to(DEV)
    out = poisoned((K, N), torch.float16, float("nan"))
    meta, uperm = kernels.unit_tables(qd)[:2]
    done = _native.cuda.dequant_units(qd.q_weight.data_ptr(), qd.q_scale.data_ptr(), meta.data_ptr(),
                                      uperm.data_ptr(), out.data_ptr(), N, qd.n_pad, meta.shape[0], stream())
    torch.cuda.synchronize()
    assert done
    assert torch.equal(out.cpu(), kernels_ref.dequant(qt, torch.float16))
    assert torch.equal(kernels.dequant(qd).cpu(), out.cpu())  # what kernels.dequant runs


TC_SIMT = 8  # flags bit: the SIMT kernel even for f16
TC_FORCE = 16  # flags bit: the tensor-core kernel also at M = 1


@pytest.mark.parametrize("K,N,layout", LAYOUTS)
@pytest.mark.parametrize("M", [1, 4, 9, 17, 32])
def test_exl2_matmul_tensor_core_and_simt_agree_with_reference(K, N, layout, M):
    """f16 I/O: the tensor-core kernel (default) and the SIMT kernel (forced) both meet the bound."""
    qt = random_qtensor(K, N, layout, seed=7 * K + N)
    qd = qt.to(DEV)
    w32 = kernels_ref.dequant(qt, torch.float32)
    xh = torch.randn(M, K, generator=gen(M + 2 * K)).half().to(DEV)
    _check_matmul(_matmul_native(xh, qd, M, (0, 0, TC_FORCE)), xh, w32, True)
    _check_matmul(_matmul_native(xh, qd, M, (0, 0, TC_SIMT)), xh, w32, True)


@pytest.mark.parametrize("ks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("M", [1, 3, 8, 16, 32])
def test_exl2_matmul_tensor_core_k_splits(ks, M):
    """Every K split of the tensor-core kernel computes the same product, deterministically."""
    qt, w32 = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    xh = torch.randn(M, qt.K, generator=gen(6)).half().to(DEV)
    y = _matmul_native(xh, qd, M, (0, ks, TC_FORCE))
    _check_matmul(y, xh, w32, True)
    assert torch.equal(y, _matmul_native(xh, qd, M, (0, ks, TC_FORCE))), "not deterministic"


def _gemv_native(xh, qd, M, warps=0, ks=0, kw=0):
    """The decode-sized kernel (matmul_gemv.cu) directly; (launched?, y)."""
    y = poisoned((M, qd.N), torch.float16, float("nan"))
    d = kernels.gemv_desc(qd, y)
    done = _native.cuda.exl2_matmul_gemv(xh.data_ptr(), *d[:5], M, qd.K, *d[5:], warps, ks, kw, stream())
    torch.cuda.synchronize()
    return done, y


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the decode-sized kernel needs sm_90 clusters")


@needs_sm90
@pytest.mark.parametrize("K,N,layout", LAYOUTS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 16, 17, 32])  # 1, 2 and 4 token tiles
@pytest.mark.parametrize("warps", [2, 4])
def test_exl2_matmul_gemv_matches_reference(K, N, layout, M, warps):
    qt = random_qtensor(K, N, layout, seed=5 * K + N)
    qd = qt.to(DEV)
    w32 = kernels_ref.dequant(qt, torch.float32)
    xh = torch.randn(M, K, generator=gen(M + 3 * K)).half().to(DEV)
    done, y = _gemv_native(xh, qd, M, warps)
    assert done
    _check_matmul(y, xh, w32, True)


@needs_sm90
@pytest.mark.parametrize("ks", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("M", [1, 4, 8, 12, 32])
def test_exl2_matmul_gemv_k_splits(ks, M):
    """Every K split (clusters of up to 16 blocks) computes the same product, deterministically."""
    qt, w32 = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    xh = torch.randn(M, qt.K, generator=gen(8)).half().to(DEV)
    done, y = _gemv_native(xh, qd, M, 4, ks)
    assert done
    _check_matmul(y, xh, w32, True)
    assert torch.equal(y, _gemv_native(xh, qd, M, 4, ks)[1]), "not deterministic"


@needs_sm90
@pytest.mark.parametrize("kw", [1, 2, 4])
@pytest.mark.parametrize("ks", [1, 3, 16])
@pytest.mark.parametrize("M", [1, 8, 32])
def test_exl2_matmul_gemv_warps_along_k(kw, ks, M):
    """A block's warps splitting its units (kw) as well as its columns: every K split, including
    warp ranges that cut groups and warps left with no unit (16 splits of 32 units), meets the bound,
    deterministically."""
    qt, w32 = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    xh = torch.randn(M, qt.K, generator=gen(10 + M)).half().to(DEV)
    done, y = _gemv_native(xh, qd, M, 4, ks, kw)
    assert done
    _check_matmul(y, xh, w32, True)
    assert torch.equal(y, _gemv_native(xh, qd, M, 4, ks, kw)[1]), "not deterministic"


@needs_sm90
def test_exl2_matmul_gemv_declines_k_warps_not_dividing_warps():
    qt, _ = _launch_shapes_qtensor()
    xh = torch.randn(1, qt.K, generator=gen(11)).half().to(DEV)
    assert not _gemv_native(xh, qt.to(DEV), 1, 2, 1, 4)[0]  # 4 warps along K in a block of 2


@needs_sm90
@pytest.mark.parametrize("offset", [3.0, -20.0])
def test_exl2_matmul_gemv_activations_far_from_zero_mean(offset):
    """The kernel subtracts sum((1024 + F * 2^(b-1)) * x / F) from f32 sums that carry it: activations with
    a large mean (sum(x) >> the signal) still meet the bound."""
    K, N, layout = 1024, 1000, [(8, 128), (6, 128), (5, 128), (4, 256), (3, 256), (2, 128)]
    qt = random_qtensor(K, N, layout, seed=21)
    qd = qt.to(DEV)
    w32 = kernels_ref.dequant(qt, torch.float32)
    for M in (1, 8, 32):
        xh = (torch.randn(M, K, generator=gen(M)) + offset).half().to(DEV)
        done, y = _gemv_native(xh, qd, M)
        assert done
        _check_matmul(y, xh, w32, True)


@needs_sm90
def test_exl2_matmul_gemv_declines_what_it_cannot_run():
    qt, _ = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    xh = torch.randn(33, qt.K, generator=gen(9)).half().to(DEV)
    assert not _gemv_native(xh, qd, 33)[0]  # M > 32


# Three linears with the same K and different N, bit widths and group structure (q, k, v-like).
GROUP_K = 320
GROUP_LAYOUTS = [
    (200, [(8, 64), (6, 64), (5, 64), (4, 64), (3, 64)]),
    (64, [(4, 128), (2, 192)]),
    (96, [(3, 32), (6, 96), (2, 128), (5, 64)]),
]


def _group_native(xh, qds, M, ks=0, kw=0):
    ys = [poisoned((M, qd.N), torch.float16, float("nan")) for qd in qds]
    desc = [v for qd, y in zip(qds, ys) for v in kernels.gemv_desc(qd, y)]
    done = _native.cuda.exl2_matmul_gemv_group(xh.data_ptr(), desc, M, xh.shape[1], 4, ks, kw, stream())
    torch.cuda.synchronize()
    return done, ys


@needs_sm90
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("M", [1, 3, 8, 24])
@pytest.mark.parametrize("ks,kw", [(0, 0), (1, 0), (4, 0), (16, 0), (1, 2), (2, 4)])
def test_exl2_matmul_gemv_group_matches_reference(count, M, ks, kw):
    """One launch over up to three linears of different shapes and layouts: each output as its own
    product, deterministically."""
    qts = [random_qtensor(GROUP_K, N, layout, seed=40 + i) for i, (N, layout) in enumerate(GROUP_LAYOUTS[:count])]
    qds = [qt.to(DEV) for qt in qts]
    xh = torch.randn(M, GROUP_K, generator=gen(M + 50)).half().to(DEV)
    done, ys = _group_native(xh, qds, M, ks, kw)
    assert done
    for qt, y in zip(qts, ys):
        _check_matmul(y, xh, kernels_ref.dequant(qt, torch.float32), True)
    again = _group_native(xh, qds, M, ks, kw)[1]
    assert all(torch.equal(a, b) for a, b in zip(ys, again)), "not deterministic"


def test_exl2_matmul_group_dispatch():
    """kernels.exl2_matmul_group: the grouped launch at M = 1 (sm_90) or one product per linear
    (M = 20, older GPUs), the same figures either way; bad inputs raise before any launch."""
    qts = [random_qtensor(GROUP_K, N, layout, seed=60 + i) for i, (N, layout) in enumerate(GROUP_LAYOUTS)]
    qds = [qt.to(DEV) for qt in qts]
    for M in (1, 20):
        xh = torch.randn(M, GROUP_K, generator=gen(M)).half().to(DEV)
        for qt, y in zip(qts, kernels.exl2_matmul_group(xh, qds)):
            _check_matmul(y, xh, kernels_ref.dequant(qt, torch.float32), True)
    with pytest.raises(ValueError, match="1 to 3 linears"):
        kernels.exl2_matmul_group(xh, qds + qds[:1])
    with pytest.raises(ValueError, match="input channels"):
        kernels.exl2_matmul_group(xh[:, :-1].contiguous(), qds)


def _swiglu_native(gh, uh, qd, M):
    y = poisoned((M, qd.N), torch.float16, float("nan"))
    done = _native.cuda.exl2_matmul_gemv_swiglu(gh.data_ptr(), uh.data_ptr(), kernels.gemv_desc(qd, y), M,
                                                gh.shape[1], stream())
    torch.cuda.synchronize()
    return done, y


@needs_sm90
@pytest.mark.parametrize("M", [1, 3, 8])
def test_exl2_matmul_gemv_swiglu_bit_exact(M):
    """The down projection staging silu(gate) * up itself: bit for bit the decode-sized kernel's
    product of silu_mul's output (the same roundings, the same launch shape)."""
    qt, _ = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    gh = (torch.randn(M, qt.K, generator=gen(M + 70)) * 3).half().to(DEV)
    uh = torch.randn(M, qt.K, generator=gen(M + 80)).half().to(DEV)
    done, y = _swiglu_native(gh, uh, qd, M)
    assert done
    done, ref = _gemv_native(kernels.silu_mul(gh, uh), qd, M)
    assert done
    assert torch.equal(y, ref)


@needs_sm90
def test_exl2_matmul_gemv_swiglu_declines_more_than_8_rows():
    qt, _ = _launch_shapes_qtensor()
    gh = torch.randn(9, qt.K, generator=gen(90)).half().to(DEV)
    assert not _swiglu_native(gh, gh, qt.to(DEV), 9)[0]


@pytest.mark.parametrize("M", [1, 5, 20])
def test_exl2_matmul_swiglu_dispatch(M):
    """kernels.exl2_matmul_swiglu: one launch where the decode-sized kernel serves the product, else
    silu_mul then exl2_matmul; the same figures as those two either way; bad inputs raise."""
    qt, _ = _launch_shapes_qtensor()
    qd = qt.to(DEV)
    gh = torch.randn(M, qt.K, generator=gen(M + 100)).half().to(DEV)
    uh = torch.randn(M, qt.K, generator=gen(M + 110)).half().to(DEV)
    assert torch.equal(kernels.exl2_matmul_swiglu(gh, uh, qd), kernels.exl2_matmul(kernels.silu_mul(gh, uh), qd))
    with pytest.raises(ValueError, match="up"):
        kernels.exl2_matmul_swiglu(gh, uh[:, :-2].contiguous(), qd)


def _shifted_q_weight(qd, words: int):
    """qd with q_weight moved to a view `words` int32 into a fresh buffer (an odd alignment)."""
    buf = torch.empty(qd.q_weight.numel() + words, dtype=torch.int32, device=DEV)
    buf[words:] = qd.q_weight.flatten()
    qd.q_weight = buf[words:].view_as(qd.q_weight)
    return qd


def test_exl2_matmul_8_byte_aligned_weights_fall_back():
    """A q_weight 8- but not 16-byte aligned takes the SIMT kernel and the old dequant, correctly."""
    qt = random_qtensor(256, 96, [(8, 32), (4, 64), (2, 128), (2, 32)], seed=3)
    qd = _shifted_q_weight(qt.to(DEV), 2)
    assert qd.q_weight.data_ptr() % 16 == 8
    xh = torch.randn(3, 256, generator=gen(4)).half().to(DEV)
    _check_matmul(kernels.exl2_matmul(xh, qd), xh, kernels_ref.dequant(qt, torch.float32), True)
    assert torch.equal(kernels.dequant(qd).cpu(), kernels_ref.dequant(qt))


def test_misaligned_q_weight_is_refused_before_any_kernel():
    qt = random_qtensor(256, 96, [(8, 32), (4, 64), (2, 128), (2, 32)], seed=3)
    qd = _shifted_q_weight(qt.to(DEV), 1)
    with pytest.raises(ValueError, match="q_weight.clone"):
        kernels.exl2_matmul(torch.randn(1, 256, device=DEV).half(), qd)


def test_exl2_matmul_large_m_through_kernels():
    qt = random_qtensor(256, 96, [(8, 32), (4, 64), (2, 128), (2, 32)], seed=1)
    qd = qt.to(DEV)
    x = torch.randn(40, 256, generator=gen(2)).half().to(DEV)
    y = kernels.exl2_matmul(x, qd)
    _check_matmul(y, x, kernels_ref.dequant(qt, torch.float32), True)


# ----------------------------------------------------------------------------- logits


def _logit_native(logits, targets, ref_idx, ref_logp):
    T, V = logits.shape
    k = 0 if ref_idx is None else ref_idx.shape[1]
    nll = poisoned((T,), torch.float32, float("nan"))
    am = poisoned((T,), torch.int64, -1)
    kld = poisoned((T,), torch.float32, float("nan")) if k else None
    native("logit_stats", logits.data_ptr(), logits.dtype == torch.float16, T, V, targets.data_ptr(),
           0 if ref_idx is None else ref_idx.data_ptr(), 0 if ref_logp is None else ref_logp.data_ptr(), k,
           nll.data_ptr(), am.data_ptr(), 0 if kld is None else kld.data_ptr())
    return nll, am, kld


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,V,k", [(1, 5, 2), (7, 1000, 8), (33, 3001, 32), (4, 2500, 0), (3, 50257, 16), (2, 152064, 64)])
def test_logit_stats_matches_reference(dtype, T, V, k):
    logits = (torch.randn(T, V, generator=gen(T + V)) * 4).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen(V), dtype=torch.int64)
    ref_idx = ref_logp = None
    if k:
        ref = torch.log_softmax(torch.randn(T, V, generator=gen(T)) * 4, dim=1)
        top = ref.topk(k, dim=1)
        ref_idx, ref_logp = top.indices.to(torch.int32).contiguous(), top.values.contiguous()
    exp = kernels_ref.logit_stats(logits, targets, ref_idx, ref_logp)
    ld, td = logits.to(DEV), targets.to(DEV)
    rid = None if ref_idx is None else ref_idx.to(DEV)
    rlp = None if ref_logp is None else ref_logp.to(DEV)
    nll, am, kld = _logit_native(ld, td, rid, rlp)
    torch.testing.assert_close(nll.cpu(), exp["nll"], rtol=1e-5, atol=1e-5)
    assert torch.equal(am.cpu(), exp["argmax"])
    if k:
        torch.testing.assert_close(kld.cpu(), exp["kld"], rtol=1e-4, atol=1e-5)
    got = kernels.logit_stats(ld, td, rid, rlp)
    assert torch.equal(got["nll"], nll) and torch.equal(got["argmax"], am)


def test_logit_stats_ties_pick_first_and_kld_zero():
    logits = torch.randn(5, 700, generator=gen(1)) * 3
    logits[:, 10] = 50.0
    logits[:, 600] = 50.0
    logp = torch.log_softmax(logits, dim=1)
    top = logp.topk(16, dim=1)
    st = kernels.logit_stats(logits.to(DEV), torch.zeros(5, dtype=torch.int64, device=DEV),
                             top.indices.int().contiguous().to(DEV), top.values.contiguous().to(DEV))
    assert torch.all(st["argmax"].cpu() == 10)
    assert st["kld"].abs().max().item() < 1e-5
    torch.testing.assert_close(st["nll"].cpu(), -logp[:, 0])


def test_logit_stats_misaligned_rows():
    # A view starting one element into the buffer: rows are not 16-byte aligned.
    T, V = 6, 4099
    buf = (torch.randn(T * V + 1, generator=gen(4)) * 4).half()
    logits = buf[1:].view(T, V)
    targets = torch.randint(0, V, (T,), generator=gen(5), dtype=torch.int64)
    exp = kernels_ref.logit_stats(logits, targets)
    nll, am, _ = _logit_native(buf.to(DEV)[1:].view(T, V), targets.to(DEV), None, None)
    torch.testing.assert_close(nll.cpu(), exp["nll"], rtol=1e-5, atol=1e-5)
    assert torch.equal(am.cpu(), exp["argmax"])
