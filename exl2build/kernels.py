"""The only door to the native kernels (exl2build._native).

Every function checks its tensors (device, dtype, shape, contiguity) and raises ValueError
before any kernel runs, allocates outputs with torch.empty on the input's device, then calls
_native.cpu.<fn> or, for CUDA tensors, _native.cuda.<fn>(..., stream). kernels_ref.py is the
plain-torch spec of each function.
"""

from __future__ import annotations

import torch

try:
    from exl2build import _native
except ImportError as e:  # pragma: no cover - only when the package was never built
    raise ImportError(
        "exl2build._native is not built: run `pip install --no-build-isolation -e .` in the checkout"
    ) from e

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
FUSED_MATMUL_MAX_ROWS = 32  # above this exl2_matmul is dequant + torch.matmul
GEMV_MAX_ROWS = 32  # up to this, f16 on sm_90 may run the decode-sized kernel (native/cuda/matmul_gemv.cu)
GEMV_SMALL_LINEAR = 4096 * 4096  # K * N up to which some M stay on the tensor-core kernel (_gemv_applies)
DEQUANT_MIN_LINEAR = 4096 * 4096  # K * N from which CUDA f16 takes dequant + torch.matmul below 32 rows too


# ----------------------------------------------------------------------------- checks


def _check(name: str, t, dtype=None, shape=None, device=None, dims=None) -> torch.Tensor:
    """Raise ValueError unless t is a contiguous tensor of the given dtype/shape/device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in dtypes:
            raise ValueError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} like the other inputs")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: tensor on {t.device}; only cpu and cuda are supported")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous() first)")
    if t.is_cuda and not _native.built_with_cuda:
        raise ValueError(f"{name}: is a CUDA tensor but exl2build._native was built without CUDA")
    return t


def _check_bits(bits) -> int:
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits={bits!r}: EXL2 bit widths are {BIT_WIDTHS}")
    return int(bits)


def _call(fn: str, device: torch.device, *args):
    """Run _native.cpu.<fn>(*args), or _native.cuda.<fn>(*args, stream) on a CUDA device."""
    if device.type == "cuda":
        if not _native.built_with_cuda:
            raise ValueError(f"{fn}: CUDA tensors given but exl2build._native was built without CUDA")
        with torch.cuda.device(device):
            return getattr(_native.cuda, fn)(*args, torch.cuda.current_stream(device).cuda_stream)
    if device.type != "cpu":
        raise ValueError(f"{fn}: tensors on {device}; only cpu and cuda are supported")
    return getattr(_native.cpu, fn)(*args)


def backend_info() -> dict:
    """What the native module offers: CUDA or not, and the CPU kernels' OpenMP threads."""
    return {"built_with_cuda": bool(_native.built_with_cuda), "cpu_threads": int(_native.cpu.num_threads())}


# ----------------------------------------------------------------------------- packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [R, N] codes < 2^bits -> int32 [R*bits/32, N] (bit stream along R, low bits first)."""
    bits = _check_bits(bits)
    _check("codes", codes, torch.uint8, dims=2)
    R, N = codes.shape
    if (R * bits) % 32:
        raise ValueError(f"codes: {R} rows of {bits} bits do not fill whole 32-bit words")
    if not codes.is_cuda and codes.numel() and int(codes.max()) >= 1 << bits:  # (no sync on CUDA)
        raise ValueError(f"codes: value {int(codes.max())} does not fit in {bits} bits")
    out = torch.empty(R * bits // 32, N, dtype=torch.int32, device=codes.device)
    _call("pack_codes", codes.device, codes.data_ptr(), out.data_ptr(), R, N, bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 [W, N] -> uint8 [rows, N]; exact inverse of pack_codes."""
    bits = _check_bits(bits)
    _check("packed", packed, torch.int32, dims=2)
    W, N = packed.shape
    if rows < 0 or rows * bits > 32 * W:
        raise ValueError(f"unpack_codes: {rows} rows of {bits} bits need more than the {W} words given")
    out = torch.empty(rows, N, dtype=torch.uint8, device=packed.device)
    _call("unpack_codes", packed.device, packed.data_ptr(), out.data_ptr(), rows, N, bits)
    return out


def pack_scales(qscale: torch.Tensor) -> torch.Tensor:
    """uint8 [G, N] scale codes in 1..16 -> int32 [G, N/8] (code-1 at bits 4*(i%8))."""
    _check("qscale", qscale, torch.uint8, dims=2)
    G, N = qscale.shape
    if N % 8:
        raise ValueError(f"qscale: N={N} must be a multiple of 8 (pad to N_pad first)")
    if not qscale.is_cuda and qscale.numel() and not 1 <= int(qscale.min()) <= int(qscale.max()) <= 16:
        raise ValueError(f"qscale: scale codes must lie in 1..16, got {int(qscale.min())}..{int(qscale.max())}")
    out = torch.empty(G, N // 8, dtype=torch.int32, device=qscale.device)
    _call("pack_scales", qscale.device, qscale.data_ptr(), out.data_ptr(), G, N)
    return out


def unpack_scales(q_scale: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [G, N/8] -> uint8 [G, n] scale codes in 1..16 (n <= 8 * q_scale.shape[1])."""
    _check("q_scale", q_scale, torch.int32, dims=2)
    G, NW = q_scale.shape
    if not 0 <= n <= NW * 8:
        raise ValueError(f"unpack_scales: n={n} exceeds the {NW * 8} columns stored")
    out = torch.empty(G, NW * 8, dtype=torch.uint8, device=q_scale.device)
    _call("unpack_scales", q_scale.device, q_scale.data_ptr(), out.data_ptr(), G, NW * 8)
    return out[:, :n].contiguous() if n != NW * 8 else out


# ----------------------------------------------------------------------------- quantization


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f32 [R, N] with f32 [N] scales -> (codes uint8 [R, N], deq f32 [R, N])."""
    bits = _check_bits(bits)
    _check("w", w, torch.float32, dims=2)
    R, N = w.shape
    _check("scale", scale, torch.float32, shape=(N,), device=w.device)
    codes = torch.empty(R, N, dtype=torch.uint8, device=w.device)
    deq = torch.empty(R, N, dtype=torch.float32, device=w.device)
    _call("quantize_rows", w.device, w.data_ptr(), scale.data_ptr(), codes.data_ptr(), deq.data_ptr(), R, N, bits)
    return codes, deq


def group_scale_search(
    w: torch.Tensor, bits: int, p_min: float = 0.70, p_max: float = 1.20, p_steps: int = 97, norm: float = 3.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales of one group f32 [R, N] -> (qscale uint8 [N] in 1..16, scale_max, scale f32 [N]).

    scale_max is a 0-d f32 tensor on w's device holding an fp16 value (a device scalar, so
    the GPTQ loop never waits for the GPU); scale is the loader's fp16 scale as f32.
    """
    bits = _check_bits(bits)
    _check("w", w, torch.float32, dims=2)
    if int(p_steps) < 1 or not (0 < p_min <= p_max) or not norm > 0:
        raise ValueError(f"group_scale_search: need p_steps >= 1, 0 < p_min <= p_max, norm > 0 "
                         f"(got p_steps={p_steps}, p_min={p_min}, p_max={p_max}, norm={norm})")
    R, N = w.shape
    if R == 0 or N == 0:
        raise ValueError(f"w: empty group of shape {tuple(w.shape)}")
    qscale = torch.empty(N, dtype=torch.uint8, device=w.device)
    scale = torch.empty(N, dtype=torch.float32, device=w.device)
    smax = torch.empty(1, dtype=torch.float32, device=w.device)
    _call("group_scale_search", w.device, w.data_ptr(), R, N, bits, float(p_min), float(p_max), int(p_steps),
          float(norm), qscale.data_ptr(), scale.data_ptr(), smax.data_ptr())
    return qscale, smax.reshape(()), scale


def gptq_group(
    w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ inside one group. w f32 [g, N] is updated in place to the dequantized rows.

    hinv: f32 [g, g], the group's block of the upper Cholesky factor of H^-1 (copied to a
    contiguous block if it is a view). Returns (codes uint8 [g, N], err f32 [g, N]).
    """
    bits = _check_bits(bits)
    _check("w", w, torch.float32, dims=2)
    g, N = w.shape
    if not isinstance(hinv, torch.Tensor) or hinv.dtype != torch.float32 or tuple(hinv.shape) != (g, g):
        got = f"{hinv.dtype} {tuple(hinv.shape)}" if isinstance(hinv, torch.Tensor) else type(hinv).__name__
        raise ValueError(f"hinv: expected float32 ({g}, {g}), got {got}")
    hinv = _check("hinv", hinv.contiguous(), device=w.device)
    _check("scale", scale, torch.float32, shape=(N,), device=w.device)
    codes = torch.empty(g, N, dtype=torch.uint8, device=w.device)
    err = torch.empty(g, N, dtype=torch.float32, device=w.device)
    _call("gptq_group", w.device, w.data_ptr(), hinv.data_ptr(), scale.data_ptr(), codes.data_ptr(),
          err.data_ptr(), g, N, bits)
    return codes, err


# ----------------------------------------------------------------------------- dequant and matmul


def _qtensor_identity(qt) -> tuple:
    """What a QTensor's validity depends on: its tensors' storage and in-place versions."""
    ts = (qt.q_weight, qt.q_scale, qt.q_scale_max, qt.q_groups, qt.q_invperm)
    return (qt.K, qt.N) + tuple((t.data_ptr(), _version_of(t), tuple(t.shape)) for t in ts)


def _version_of(t: torch.Tensor) -> int:
    # Inference-mode tensors keep no version counter; they count as never modified.
    return -1 if t.is_inference() else t._version


def _check_qtensor(qt) -> torch.device:
    """Validate a QTensor's tensors for the kernels; returns its device.

    The value checks read q_invperm and q_groups back to the host, which would stall
    every decode step and break CUDA-graph capture, so a QTensor is validated once and
    re-validated only when one of its tensors is replaced or modified in place.
    """
    ident = _qtensor_identity(qt)
    if getattr(qt, "_validated", None) == ident:
        return qt.q_weight.device
    dev = _validate_qtensor(qt)
    object.__setattr__(qt, "_validated", ident)
    return dev


def _validate_qtensor(qt) -> torch.device:
    dev = qt.q_weight.device
    n_pad = (qt.N + 31) // 32 * 32
    _check("q_weight", qt.q_weight, torch.int32, dims=2)
    if dev.type == "cuda" and qt.q_weight.data_ptr() % 8:
        raise ValueError(f"q_weight: the CUDA kernels read it in 8-byte words, but its data starts at byte offset "
                         f"{qt.q_weight.data_ptr() % 8} of a word (a view into another tensor?); pass "
                         f"q_weight.clone() instead")
    if qt.q_weight.shape[1] != n_pad:
        raise ValueError(f"q_weight: {qt.q_weight.shape[1]} columns, expected N_pad={n_pad} for N={qt.N}")
    G = qt.q_scale_max.shape[0] if qt.q_scale_max.dim() == 1 else -1
    _check("q_scale", qt.q_scale, torch.int32, shape=(G, n_pad // 8), device=dev)
    _check("q_scale_max", qt.q_scale_max, torch.float16, shape=(G,), device=dev)
    _check("q_groups", qt.q_groups, torch.int16, shape=(2 * G,), device=dev)
    _check("q_invperm", qt.q_invperm, torch.int32, shape=(qt.K,), device=dev)
    qt.validate()  # the format's value checks: bit widths, groups covering K rows, q_invperm a permutation
    return dev


def dequant(qt, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """QTensor -> W^T [K, N] in original row order; float16 (default) or float32."""
    dev = _check_qtensor(qt)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dequant: dtype {dtype} not supported (float16 or float32)")
    out = torch.empty(qt.K, qt.N, dtype=dtype, device=dev)
    if dev.type == "cuda" and dtype == torch.float16:
        # The unit-decoding kernel over the unit tables (built once per QTensor, as for the
        # decode-sized matmul); it declines misaligned tensors and more than 65535 units.
        tables = _unit_tables(qt, qt._validated)  # _check_qtensor has just computed the identity
        if tables is not None:
            meta, uperm = tables[:2]
            if _call("dequant_units", dev, qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), meta.data_ptr(),
                     uperm.data_ptr(), out.data_ptr(), qt.N, qt.q_weight.shape[1], meta.shape[0]):
                return out
    args = [qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), qt.q_scale_max.data_ptr(), qt.q_groups.data_ptr(),
            qt.q_invperm.data_ptr(), out.data_ptr(), qt.K, qt.N, qt.q_weight.shape[1], qt.q_scale_max.shape[0]]
    args.append(dtype == torch.float16)
    _call("dequant", dev, *args)
    return out


# Position of unit slot i (row i of a 32-row unit) in the tensor-core kernels' K-slot order:
# pair r = rows (8t + r, 8t + r + 4) of lane t, stored as [t][pair][lo/hi] (tc_decode.cuh).
_SLOT_POSITION = torch.tensor([(i >> 3) * 8 + (i & 3) * 2 + ((i >> 2) & 1) for i in range(32)])
# log2 of the pair factor F of native/cuda/tc_decode.cuh (pair_factor): the decoders leave code r of a
# pair (low half) and code r + 4 (high half) at 1024 + F * q, so the decode-sized kernel stages x / F
# for each slot. Per bit width: (low, high) for pairs 0..3.
_PAIR_LOG2 = {
    2: ((0, 0), (2, 2), (4, 4), (6, 6)),
    3: ((4, 0), (4, 0), (6, 2), (4, 0)),
    4: ((0, 0), (4, 4), (0, 0), (4, 4)),
    5: ((0, 0), (5, 5), (0, 0), (0, 0)),
    6: ((0, 0), (0, 0), (4, 4), (0, 0)),
    8: ((0, 0), (0, 0), (0, 0), (0, 0)),
}
UNIT_PERM_CHANNEL = 0xFFFFFF  # unit_perm entries: channel | log2(F) << 24 (-1: past a short unit's rows)
# [bits][slot position] -> log2(F); slot position p of a unit is half p % 2 of pair (p // 2) % 4.
_SLOT_LOG2 = torch.zeros(9, 32, dtype=torch.int64)
for _b, _l2 in _PAIR_LOG2.items():
    _SLOT_LOG2[_b] = torch.tensor([_l2[(p >> 1) & 3][p & 1] for p in range(32)])


def unit_tables(qt) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None:
    """(unit_meta int32 [U, 4], unit_perm int32 [U * 32], max bits, unit widths) of a QTensor.

    A unit is 32 rows of one group (a group's last unit may be shorter). unit_meta holds, per
    unit: first word row in q_weight, first permuted K row, bits | words << 4 | rows << 10 |
    (last unit of its group) << 16, and group | q_scale_max bits << 16. unit_perm holds the
    input channel of each unit slot in the kernels' K-slot order (bits 0-23; -1 past a short unit's
    rows) and, in bits 24-26, log2 of the slot's pair factor (the decode-sized kernel divides x by it).
    unit_meta and unit_perm are on the QTensor's device; the unit widths (uint8 [U], host memory) are
    there only where the widths differ (else None): the decode-sized kernel's launcher splits K by
    them. The decode-sized CUDA kernel reads these instead of rebuilding them in every block. Built
    on the host once per QTensor and cached while its tensors stay the same; None when the
    linear has more groups than the tables can name (65536).
    """
    return _unit_tables(qt, _qtensor_identity(qt))


def _unit_tables(qt, ident: tuple):
    """unit_tables for a QTensor whose identity (_qtensor_identity) the caller has at hand."""
    cached = getattr(qt, "_unit_tables", None)
    if cached is not None and cached[0] == ident:
        return cached[1]
    groups = qt.group_rows()
    tables = None
    if len(groups) < 65536:
        qg = [v & 0xFFFF for v in qt.q_groups.to("cpu", torch.int64).tolist()]
        smax = (qt.q_scale_max.to("cpu").view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
        meta = []
        for g, (bits, k_row, rows) in enumerate(groups):
            n_units = (rows + 31) // 32
            for lu in range(n_units):
                r = min(32, rows - 32 * lu)
                w = g | (smax[g] << 16)
                meta.append((qg[2 * g + 1] + lu * bits, k_row + 32 * lu,
                             bits | (((r * bits + 31) // 32) << 4) | (r << 10) | (int(lu == n_units - 1) << 16),
                             w - (1 << 32) if w >= (1 << 31) else w))
        meta_t = torch.tensor(meta, dtype=torch.int32)
        slot = torch.arange(32)
        rows_u = (meta_t[:, 2] >> 10) & 63
        src = meta_t[:, 1:2].long() + slot[None, :]
        src[slot[None, :] >= rows_u[:, None]] = -1
        by_pos = torch.empty_like(src)
        by_pos[:, _SLOT_POSITION] = src
        by_pos = by_pos.reshape(-1).to(qt.q_weight.device)
        perm = qt.perm.long()
        factor = _SLOT_LOG2[(meta_t[:, 2] & 15).long()].reshape(-1).to(by_pos.device) << 24
        uperm = torch.where(by_pos >= 0, perm[by_pos.clamp(min=0)] | factor, -1).to(torch.int32)
        widths = (meta_t[:, 2] & 15).to(torch.uint8)
        tables = (meta_t.to(qt.q_weight.device), uperm, max(b for b, _, _ in groups),
                  widths.contiguous() if len(set(widths.tolist())) > 1 else None)
    object.__setattr__(qt, "_unit_tables", (ident, tables))
    return tables


def _check_matmul_input(x: torch.Tensor, qt) -> torch.device:
    dev = _check_qtensor(qt)
    _check("x", x, (torch.float16, torch.float32), dims=2, device=dev)
    if x.shape[1] != qt.K:
        raise ValueError(f"x: {x.shape[1]} input channels, the quantized linear has K={qt.K}")
    return dev


def uses_dequant(M: int, K: int, N: int, cuda_f16: bool) -> bool:
    """Whether exl2_matmul computes x [M, K] @ W [K, N] as dequant + torch.matmul, not a fused kernel.

    Always above FUSED_MATMUL_MAX_ROWS. On CUDA f16 also at fewer rows, where an H200 measured it
    faster (benchmarks/RESULTS.md, session 5: the dequantizer runs at ~80 % of copy bandwidth and
    cuBLAS barely slows from 8 to 32 rows, while the fused kernels grow with the rows):
      * 17-32 rows on linears of 4096x4096 and larger. At 32 rows, dequant + cuBLAS against the best fused kernel:
        4096x4096 12 + 14 vs 68 us; 4096x14336 45 + 31 vs 115; 14336x4096 46 + 34 vs 192; 8192x28672 179 + 111 vs 384.
        At 16 rows the fused kernel still wins, except on 4096x4096.
      * 9-16 rows on 4096x4096 (26 vs 37 us at 16 rows; the fused kernel wins at 8).
    Smaller linears keep the fused kernels (not measured there).
    """
    if M > FUSED_MATMUL_MAX_ROWS:
        return True
    KN = K * N
    return cuda_f16 and KN >= DEQUANT_MIN_LINEAR and (M > 16 or (M > 8 and KN <= GEMV_SMALL_LINEAR))


def _uses_dequant(x: torch.Tensor, N: int) -> bool:
    return uses_dequant(x.shape[0], x.shape[1], N, x.is_cuda and x.dtype == torch.float16)


def _gemv_applies(x: torch.Tensor, N: int) -> bool:
    """Whether the decode-sized kernel serves x [M, K] (N output columns in all). Measured on an
    H200 (benchmarks/RESULTS.md, session 4): above 4096x4096 it is the faster kernel at every M up
    to 32 (1.4-2.8x the tensor-core kernel at M = 8-32); at 4096x4096 and below only at M = 1 and
    around M = 16 (37 vs 56 us; the tensor-core kernel wins at M = 8 and 32). It declines older
    GPUs itself."""
    M, K = x.shape
    if not (x.is_cuda and x.dtype == torch.float16 and 0 < M <= GEMV_MAX_ROWS):
        return False
    return K * N > GEMV_SMALL_LINEAR or M == 1 or 8 < M <= 16


def gemv_desc(qt, y: torch.Tensor) -> list[int] | None:
    """The 10 ints the decode-sized kernels (exl2_matmul_gemv, _group, _swiglu) take per linear,
    writing its product into y: q_weight, q_scale, unit_meta, unit_perm and y pointers, N, N_pad,
    units, max bits, and the host pointer of the unit widths (0 for one width). None without unit
    tables. Validates qt first (for callers outside this module)."""
    _check_qtensor(qt)
    return _gemv_desc(qt, y)


def _gemv_desc(qt, y: torch.Tensor) -> list[int] | None:
    """gemv_desc for a qtensor that _check_qtensor has just validated."""
    tables = _unit_tables(qt, qt._validated)  # _check_qtensor has just computed the identity
    if tables is None:
        return None
    meta, uperm, max_bits, widths = tables
    return [qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), meta.data_ptr(), uperm.data_ptr(), y.data_ptr(), qt.N,
            qt.q_weight.shape[1], meta.shape[0], max_bits, 0 if widths is None else widths.data_ptr()]


def exl2_matmul(x: torch.Tensor, qt) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W (x in original channel order; no bias). Same dtype as x.

    Fused dequant-and-multiply for M <= 32; dequant + torch.matmul above (f32 math on CPU), and
    on CUDA f16 at fewer rows where `uses_dequant` says that is faster. On sm_90 with f16 the
    decode-sized kernel runs where `_gemv_applies` says it is faster. It needs `unit_tables(qt)`,
    built on the first call: run one call before capturing a CUDA graph (as for the validation
    of qt).
    """
    dev = _check_matmul_input(x, qt)
    M, K = x.shape
    if _uses_dequant(x, qt.N):
        # CUDA multiplies in x's dtype; the CPU always in f32 (torch's fp16 CPU matmul is slow).
        w = dequant(qt, x.dtype if dev.type == "cuda" else torch.float32)
        return torch.matmul(x.to(w.dtype), w).to(x.dtype)
    y = torch.empty(M, qt.N, dtype=x.dtype, device=dev)
    if _gemv_applies(x, qt.N):
        d = _gemv_desc(qt, y)
        if d is not None and _call("exl2_matmul_gemv", dev, x.data_ptr(), *d[:5], M, K, *d[5:], 0, 0, 0):
            return y
    args = [x.data_ptr(), qt.q_weight.data_ptr(), qt.q_scale.data_ptr(), qt.q_scale_max.data_ptr(),
            qt.q_groups.data_ptr(), qt.perm.data_ptr(), y.data_ptr(), M, K, qt.N, qt.q_weight.shape[1],
            qt.q_scale_max.shape[0]]
    args.append(x.dtype == torch.float16)
    if M > 0:
        _call("exl2_matmul", dev, *args)
    return y


def exl2_matmul_group(x: torch.Tensor, qts) -> list[torch.Tensor]:
    """[x @ W for W in qts]: the products of up to 3 quantized linears reading the same x (q, k and
    v; gate and up), in one launch of the decode-sized kernel where it applies (one launch
    instead of three hides one kernel's start-up and tail), else one exl2_matmul per linear."""
    qts = list(qts)
    if not 1 <= len(qts) <= 3:
        raise ValueError(f"exl2_matmul_group: 1 to 3 linears, got {len(qts)}")
    dev = None
    for qt in qts:
        dev = _check_matmul_input(x, qt)
    M, K = x.shape
    if _gemv_applies(x, sum(qt.N for qt in qts)) and not _uses_dequant(x, max(qt.N for qt in qts)):
        ys = [torch.empty(M, qt.N, dtype=x.dtype, device=dev) for qt in qts]
        descs = [_gemv_desc(qt, y) for qt, y in zip(qts, ys)]
        if all(d is not None for d in descs) and _call("exl2_matmul_gemv_group", dev, x.data_ptr(),
                                                       [v for d in descs for v in d], M, K, 0, 0, 0):
            return ys
    return [exl2_matmul(x, qt) for qt in qts]


def exl2_matmul_swiglu(gate: torch.Tensor, up: torch.Tensor, qt) -> torch.Tensor:
    """(silu(gate) * up) @ W: the SwiGLU MLP's down projection, gate and up f16 [M, K] on CUDA.

    Where the decode-sized kernel serves the product (the same choice as exl2_matmul's, up to 8
    rows), it computes silu(gate) * up while it stages x, with silu_mul's roundings: one launch
    fewer per layer and the same result as silu_mul then exl2_matmul. Elsewhere it runs those two.
    """
    _check_f16_cuda("gate", gate)
    _check_f16_cuda("up", up, shape=gate.shape, device=gate.device)
    if gate.dim() != 2:
        raise ValueError(f"exl2_matmul_swiglu: gate and up are [M, K], got shape {tuple(gate.shape)}")
    M, K = gate.shape
    _check_matmul_input(gate, qt)
    if 0 < M <= 8 and not _uses_dequant(gate, qt.N) and _gemv_applies(gate, qt.N):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(M, qt.N, dtype=gate.dtype, device=gate.device)
        d = _gemv_desc(qt, y)
        if d is not None and _call("exl2_matmul_gemv_swiglu", gate.device, gate.data_ptr(), up.data_ptr(), d, M, K):
            return y
    return exl2_matmul(silu_mul(gate, up), qt)


# ----------------------------------------------------------------------------- logits


def logit_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_idx: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> dict:
    """One pass over V per row: {'nll' f32 [T], 'argmax' int64 [T], 'kld' f32 [T] (with a ref)}.

    ref_idx int32 [T, k] / ref_logp f32 [T, k]: the reference's top-k indices and log-probs;
    KLD(ref || q) adds one tail bucket for the remaining probability.
    """
    _check("logits", logits, (torch.float16, torch.float32), dims=2)
    T, V = logits.shape
    dev = logits.device
    _check("targets", targets, torch.int64, shape=(T,), device=dev)
    if T and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets: values must lie in [0, {V}), got [{int(targets.min())}, {int(targets.max())}]")
    if (ref_idx is None) != (ref_logp is None):
        raise ValueError("logit_stats: give both ref_idx and ref_logp, or neither")
    k = 0
    if ref_idx is not None:
        _check("ref_idx", ref_idx, torch.int32, dims=2, device=dev)
        k = ref_idx.shape[1]
        if ref_idx.shape[0] != T:
            raise ValueError(f"ref_idx: {ref_idx.shape[0]} rows, logits have T={T}")
        _check("ref_logp", ref_logp, torch.float32, shape=(T, k), device=dev)
        if T and k and (int(ref_idx.min()) < 0 or int(ref_idx.max()) >= V):
            raise ValueError(f"ref_idx: indices must lie in [0, {V})")
    nll = torch.empty(T, dtype=torch.float32, device=dev)
    argmax = torch.empty(T, dtype=torch.int64, device=dev)
    kld = torch.empty(T, dtype=torch.float32, device=dev) if ref_idx is not None else None
    if T and V:
        _call("logit_stats", dev, logits.data_ptr(), logits.dtype == torch.float16, T, V, targets.data_ptr(),
              0 if ref_idx is None else ref_idx.data_ptr(), 0 if ref_logp is None else ref_logp.data_ptr(), k,
              nll.data_ptr(), argmax.data_ptr(), 0 if kld is None else kld.data_ptr())
    out = {"nll": nll, "argmax": argmax}
    if kld is not None:
        out["kld"] = kld
    return out


# ----------------------------------------------------------------------------- forward pass (CUDA, f16)
# Fused versions of the forward pass's small operations (native/cuda/forward.cu). CUDA and f16
# only: model/forward.py uses them there and plain torch elsewhere (kernels_ref.py has both forms).


def forward_ops_available(t: torch.Tensor) -> bool:
    """Whether the fused forward operations can run on tensors like t."""
    return t.is_cuda and t.dtype == torch.float16 and bool(_native.built_with_cuda)


def _check_f16_cuda(name: str, t, shape=None, device=None) -> torch.Tensor:
    _check(name, t, torch.float16, shape=shape, device=device)
    if not t.is_cuda:
        raise ValueError(f"{name}: the fused forward operations run on CUDA only (got {t.device}); use torch on CPU")
    return t


def rms_norm(x: torch.Tensor, weight_f32: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h) * weight, h) over the last dim, h = x or, with a residual, h = x + residual (f16).

    The norm runs in f32 (h * rsqrt(mean(h^2) + eps) * weight) and rounds once to f16.
    """
    _check_f16_cuda("x", x)
    dim = x.shape[-1]
    _check("weight_f32", weight_f32, torch.float32, shape=(dim,), device=x.device)
    if residual is not None:
        _check_f16_cuda("residual", residual, shape=x.shape, device=x.device)
    out = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    rows = x.numel() // dim if dim else 0
    if rows:
        _call("rms_norm", x.device, x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight_f32.data_ptr(),
              out.data_ptr(), 0 if residual is None else h.data_ptr(), rows, dim, float(eps))
    return out, h


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, pos) -> None:
    """RoPE of q [B, T, H*D] in place; RoPE(k) and v [B, T, Hkv*D] stored into k_cache / v_cache
    [B, Hkv, max_len, D] at positions `pos` (a device LongTensor [T], or an int start).

    cos / sin [T, D]: RotaryEmbedding's rows (sin with its first half negated).
    """
    _check_f16_cuda("q", q)
    if q.dim() != 3:
        raise ValueError(f"q: expected [B, T, heads * head_dim], got shape {tuple(q.shape)}")
    dev = q.device
    _check_f16_cuda("k_cache", k_cache, device=dev)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache: expected [B, kv_heads, max_len, head_dim], got shape {tuple(k_cache.shape)}")
    B, T, _ = q.shape
    _, Hkv, max_len, D = k_cache.shape
    if k_cache.shape[0] != B or D % 2 or D > 512 or q.shape[2] % D:
        raise ValueError(f"rope_cache: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} do not fit "
                         "(same batch, an even head_dim <= 512 dividing q's last dim)")
    H = q.shape[2] // D
    _check_f16_cuda("v_cache", v_cache, shape=k_cache.shape, device=dev)
    _check_f16_cuda("k", k, shape=(B, T, Hkv * D), device=dev)
    _check_f16_cuda("v", v, shape=(B, T, Hkv * D), device=dev)
    _check_f16_cuda("cos", cos, shape=(T, D), device=dev)
    _check_f16_cuda("sin", sin, shape=(T, D), device=dev)
    if isinstance(pos, torch.Tensor):
        _check("pos", pos, torch.int64, shape=(T,), device=dev)
        pos_ptr, start = pos.data_ptr(), 0
    else:
        start = int(pos)
        if start < 0 or start + T > max_len:
            raise ValueError(f"rope_cache: positions {start}..{start + T - 1} do not fit a cache of {max_len}")
        pos_ptr = 0
    if B * T:
        _call("rope_cache", dev, q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
              k_cache.data_ptr(), v_cache.data_ptr(), pos_ptr, start, B, T, H, Hkv, D, max_len)


DECODE_ATTENTION_MAX_HEAD_DIM = 128


def decode_attention_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` serves this shape (head_dim a multiple of 8 up to 128, one token)."""
    D = k_cache.shape[-1]
    return forward_ops_available(q) and q.dim() == 3 and q.shape[1] == 1 and D % 8 == 0 and \
        D <= DECODE_ATTENTION_MAX_HEAD_DIM


def decode_attention_rope_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` can also do rope_cache's work for the token (`new`)."""
    return decode_attention_applies(q, k_cache) and k_cache.shape[-1] % 16 == 0


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     new: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one query token per sequence over keys 0..pos[0] of the cache.

    q [B, 1, H*D] (the rows of that token, roped), caches [B, Hkv, max_len, D], pos a device
    LongTensor [1] (the token's position, already stored); returns [B, 1, H*D] f16.

    new = (k, v, cos, sin): the same launch also does `rope_cache`'s work for the token (one kernel
    fewer per layer in a decode step): q is unroped (and left so), RoPE(k) and v [B, 1, Hkv*D]
    are stored into the caches at pos[0], cos / sin [1, D] are the position's rows. Needs a
    head_dim multiple of 16 (`decode_attention_rope_applies`).
    """
    _check_f16_cuda("q", q)
    dev = q.device
    _check_f16_cuda("k_cache", k_cache, device=dev)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache: expected [B, kv_heads, max_len, head_dim], got shape {tuple(k_cache.shape)}")
    B, Hkv, L, D = k_cache.shape
    if not decode_attention_applies(q, k_cache) or q.shape[0] != B or q.shape[2] % D:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} do not fit (one "
                         f"token, same batch, a head_dim multiple of 8 up to {DECODE_ATTENTION_MAX_HEAD_DIM})")
    H = q.shape[2] // D
    if H % Hkv:
        raise ValueError(f"decode_attention: {H} query heads are not a multiple of {Hkv} kv heads")
    _check_f16_cuda("v_cache", v_cache, shape=k_cache.shape, device=dev)
    _check("pos", pos, torch.int64, shape=(1,), device=dev)
    ptrs = [0, 0, 0, 0]
    if new is not None:
        if D % 16:
            raise ValueError(f"decode_attention: RoPE in the same launch needs a head_dim multiple of 16, got {D} "
                             "(run rope_cache first and call without `new`)")
        k, v, cos, sin = new
        _check_f16_cuda("k", k, shape=(B, 1, Hkv * D), device=dev)
        _check_f16_cuda("v", v, shape=(B, 1, Hkv * D), device=dev)
        _check_f16_cuda("cos", cos, shape=(1, D), device=dev)
        _check_f16_cuda("sin", sin, shape=(1, D), device=dev)
        ptrs = [k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr()]
    out = torch.empty_like(q)
    if B:
        _call("decode_attention", dev, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(),
              out.data_ptr(), B, H, Hkv, D, L, *ptrs)
    return out


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in f16 (the SwiGLU MLP's middle)."""
    _check_f16_cuda("g", g)
    _check_f16_cuda("u", u, shape=g.shape, device=g.device)
    if g.numel() % 2:
        raise ValueError(f"silu_mul: an even element count is needed, got shape {tuple(g.shape)}")
    out = torch.empty_like(g)
    if g.numel():
        _call("silu_mul", g.device, g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel())
    return out
