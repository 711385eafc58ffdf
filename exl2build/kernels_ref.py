"""Plain-torch reference of every kernel in kernels.py: the executable spec.

Same signatures as kernels.py. Slow but obvious; tests compare the native kernels to these.
Bit-exact where the math allows (packing, scales, quantization, GPTQ); the matmul and the
logit statistics agree to float tolerance (summation order differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MASK32 = (1 << 32) - 1


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2^32) as int32 (two's complement wrap)."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _to_uint32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & _MASK32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [R, N] codes -> int32 [R*bits/32, N]: a little-endian bit stream along R per column."""
    R, N = codes.shape
    words = torch.zeros(R * bits // 32, N, dtype=torch.int64)
    v = codes.to(torch.int64).cpu()
    for i in range(R):
        off = bits * i
        w, sh = off // 32, off % 32
        words[w] |= (v[i] << sh) & _MASK32
        if sh + bits > 32:  # straddles: the high bits go to the next word
            words[w + 1] |= v[i] >> (32 - sh)
    return _to_int32(words).to(codes.device)


def unpack_codes(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Exact inverse of pack_codes: int32 [W, N] -> uint8 [rows, N]."""
    words = _to_uint32(packed.cpu())
    out = torch.empty(rows, packed.shape[1], dtype=torch.int64)
    mask = (1 << bits) - 1
    for i in range(rows):
        off = bits * i
        w, sh = off // 32, off % 32
        v = words[w] >> sh
        if sh + bits > 32:
            v = v | (words[w + 1] << (32 - sh))
        out[i] = v & mask
    return out.to(torch.uint8).to(packed.device)


def pack_scales(qscale: torch.Tensor) -> torch.Tensor:
    """uint8 [G, N] scale codes in 1..16 -> int32 [G, N/8] holding code-1 at bits 4*(i%8)."""
    G, N = qscale.shape
    v = (qscale.to(torch.int64).cpu() - 1).reshape(G, N // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return _to_int32((v << shifts).sum(-1)).to(qscale.device)


def unpack_scales(q_scale: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [G, N/8] -> uint8 [G, n] scale codes in 1..16."""
    G = q_scale.shape[0]
    words = _to_uint32(q_scale.cpu())
    shifts = torch.arange(8, dtype=torch.int64) * 4
    v = ((words[:, :, None] >> shifts) & 15) + 1
    return v.reshape(G, -1)[:, :n].to(torch.uint8).to(q_scale.device)


def scales_fp16(qscale: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """The loader's fp16 scale: half(s*s) * (half(scale_max) * half(1/256)), returned as f32.

    qscale: [..., N] codes 1..16; scale_max: broadcastable to qscale[..., :1] (any float dtype).
    """
    s2 = (qscale.to(torch.float32) ** 2).to(torch.float16)
    smax = scale_max.to(torch.float16) * torch.tensor(1 / 256, dtype=torch.float16)
    return (s2 * smax).to(torch.float32)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: q = clamp(round(w/scale) + 2^(b-1), 0, 2^b-1).

    A zero scale (fp16 underflow) gives the zero code. Returns (codes uint8, deq f32).
    """
    zero = float(1 << (bits - 1))
    ratio = torch.where(scale > 0, w / scale, torch.zeros_like(w))
    q = torch.clamp(torch.round(ratio) + zero, 0, (1 << bits) - 1)
    deq = (q - zero) * scale
    return q.to(torch.uint8), deq


def p_grid(p_min: float, p_max: float, p_steps: int) -> torch.Tensor:
    """The searched factors, computed in f32 the way the native kernel does."""
    if p_steps == 1:
        return torch.tensor([p_min], dtype=torch.float32)
    lo = torch.tensor(p_min, dtype=torch.float32)
    hi = torch.tensor(p_max, dtype=torch.float32)
    t = torch.arange(p_steps, dtype=torch.float32) / torch.tensor(float(p_steps - 1), dtype=torch.float32)
    return lo + (hi - lo) * t


def base_scale_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit sqrt-coded scale codes uint8 [N], scale_max0 f32 scalar) of one group."""
    base = w.abs().amax(0) / float(1 << (bits - 1))
    smax0 = base.max()
    ratio = base / smax0 if smax0 > 0 else torch.zeros_like(base)
    s = torch.clamp(torch.round(torch.sqrt(ratio) * 16.0), 1, 16)
    return s.to(torch.uint8), smax0


def group_scale_search(
    w: torch.Tensor, bits: int, p_min: float = 0.70, p_max: float = 1.20, p_steps: int = 97, norm: float = 3.5
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Scales of one group: (qscale uint8 [N], scale_max float (fp16 value), scale f32 [N]).

    Each factor p is scored with the scales the loader will really use; sum |err|^norm is
    accumulated in float64; the first minimum wins.
    """
    qscale, smax0 = base_scale_codes(w, bits)
    best, best_score = None, None
    for p in p_grid(p_min, p_max, p_steps):
        smax = (smax0 * p).to(torch.float16)
        scale = scales_fp16(qscale, smax)
        _, deq = quantize_rows(w, scale, bits)
        score = (w - deq).to(torch.float64).abs().pow(norm).sum().item()
        if best_score is None or score < best_score:
            best, best_score = (smax, scale), score
    smax, scale = best
    return qscale, torch.tensor(float(smax), dtype=torch.float32, device=w.device), scale


def gptq_group(
    w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ inside one group; w [g, N] is updated in place and ends as the dequantized rows.

    hinv: the group's [g, g] block of the upper Cholesky factor of H^-1.
    Returns (codes uint8 [g, N], err f32 [g, N]) with err_i = (w_i - deq_i) / hinv[i, i].
    """
    g, N = w.shape
    codes = torch.empty(g, N, dtype=torch.uint8)
    err = torch.empty(g, N, dtype=torch.float32)
    for i in range(g):
        q, deq = quantize_rows(w[i : i + 1], scale, bits)
        codes[i] = q[0]
        err[i] = (w[i] - deq[0]) / hinv[i, i]
        w[i + 1 :] -= hinv[i, i + 1 :, None] * err[i][None, :]
        w[i] = deq[0]
    return codes, err


def dequant(qt, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W^T [K, N] in original row order (f16 by default; f32 keeps the exact products)."""
    qw = qt.q_weight.cpu()
    qs = unpack_scales(qt.q_scale.cpu(), qt.n_pad)
    smax = qt.q_scale_max.cpu()
    qg = qt.q_groups.cpu().to(torch.int64)
    rows_out = []
    for gi, (bits, _k0, rows) in enumerate(qt.group_rows()):
        w0 = int(qg[2 * gi + 1])
        nwords = (rows * bits + 31) // 32
        codes = unpack_codes(qw[w0 : w0 + nwords], bits, rows).to(torch.float32)
        scale = scales_fp16(qs[gi], smax[gi])
        rows_out.append((codes - float(1 << (bits - 1))) * scale)
    deq = torch.cat(rows_out)[:, : qt.N]
    return deq[qt.q_invperm.cpu().long()].to(dtype).to(qt.q_weight.device)


def exl2_matmul(x: torch.Tensor, qt) -> torch.Tensor:
    """y = x @ W^T-dequantized, x [M, K] in original channel order; f32 math, x's dtype out."""
    w = dequant(qt, torch.float32)
    return (x.cpu().to(torch.float32) @ w).to(x.dtype).to(x.device)


def logit_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_idx: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> dict:
    """Per row: nll = -log softmax(logits)[target], argmax, and optional top-k+tail KLD(ref || q).

    KLD = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail) over the reference's
    top-k indices, tails = 1 - sum of the top-k (p_tail clamped at 0, q_tail at 1e-10),
    computed in float64.
    """
    lf = logits.to(torch.float32)
    lse = torch.logsumexp(lf, dim=1)
    nll = lse - lf.gather(1, targets.long()[:, None])[:, 0]
    out = {"nll": nll, "argmax": lf.argmax(1)}
    if ref_idx is not None:
        logq = lf.gather(1, ref_idx.long()).double() - lse.double()[:, None]
        logp = ref_logp.double()
        p, q = logp.exp(), logq.exp()
        p_tail = torch.clamp(1.0 - p.sum(1), min=0.0)
        q_tail = torch.clamp(1.0 - q.sum(1), min=1e-10)
        tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp(min=1e-300)) - torch.log(q_tail)), 0.0)
        out["kld"] = ((p * (logp - logq)).sum(1) + tail).to(torch.float32)
    return out


# ----------------------------------------------------------------------------- forward pass
# The torch forms of the fused forward operations (model/forward.py runs these on CPU).


def rms_norm(x: torch.Tensor, weight_f32: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    return F.rms_norm(h.float(), (h.shape[-1],), weight_f32, eps).to(h.dtype), h


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] in the rotate-half form, sin with its first half negated."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def rope_cache(q, k, v, cos, sin, k_cache, v_cache, pos) -> None:
    B, T, _ = q.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    qh = q.view(B, T, -1, D).transpose(1, 2)
    qh.copy_(rope(qh, cos, sin))
    idx = pos if isinstance(pos, torch.Tensor) else torch.arange(pos, pos + T, device=q.device)
    k_cache.index_copy_(2, idx, rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin))
    v_cache.index_copy_(2, idx, v.view(B, T, Hkv, D).transpose(1, 2))


def decode_attention(q, k_cache, v_cache, pos) -> torch.Tensor:
    B, _, HD = q.shape
    Hkv, L, D = k_cache.shape[1:]
    qh = q.view(B, 1, HD // D, D).transpose(1, 2)
    mask = torch.arange(L, device=q.device)[None, :] <= pos[:, None]
    o = F.scaled_dot_product_attention(qh, k_cache, v_cache, attn_mask=mask, enable_gqa=HD // D != Hkv)
    return o.transpose(1, 2).reshape(B, 1, HD)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u
