// Tensor-core decoding of EXL2 units, shared by the fused matmuls (matmul_tc.cu, matmul_gemv.cu)
// and the fp16 dequantizer.
//
// A warp covers 64 output columns of one 32-row unit. Lane (gid = lane / 4, t = lane % 4) holds
// the words of its 8 columns (base + 4*gid + 0..3 and base + 32 + 4*gid + 0..3) that contain rows
// 8t..8t+7 of the unit: at most two word rows for any bit width. The mma's K slots are a free
// permutation of the unit's rows, so pair r (0..3) = rows (8t + r, 8t + r + 4) of a column; step 0
// of the unit takes pairs 0 and 1, step 1 pairs 2 and 3, and x is staged in that order.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"
#include "pair_factor.h"

namespace exl2cuda {

// The weight loads of one unit for one lane, and what is needed to finish its group.
struct Stage {
    uint4 w[2][2];  // [word row j0, j0 + 1][column chunk 0, 1]
    uint32_t sc[2]; // q_scale words of the lane's two column chunks
};

__device__ __forceinline__ uint4 ldg4(const int32_t* p, bool pred) {
    return pred ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int k) {
    return k == 0 ? v.x : (k == 1 ? v.y : (k == 2 ? v.z : v.w));
}

// (a & MASK) | c in one LOP3: the compiler would otherwise spend two, as a LOP3 takes a single
// immediate; c (the fp16 exponent pattern) is kept in a register.
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));
    return d;
}

// 2 bits: v holds codes 0..3 at bits 0..7 and 4..7 at bits 16..23 (byte 0 of the window copied to
// byte 0, byte 1 to byte 2); pair r at bits 2r of each half.
__device__ __forceinline__ void pairs_2bit(uint32_t v, uint32_t (&P)[4]) {
    const uint32_t magic = 0x64006400u;
    P[0] = and_or<0x00030003u>(v, magic);
    P[1] = and_or<0x000C000Cu>(v, magic);
    P[2] = and_or<0x00300030u>(v, magic);
    P[3] = and_or<0x00C000C0u>(v, magic);
}

// decode_pairs leaves code r of each pair at 1024 + F * code, F = pair_factor<B>(r, half)
// (pair_factor.h). Callers divide by F: center() in its fused multiply-add, the decode-sized matmul
// by staging x's K slots as x / F (exact for normal fp16 values).

// Pairs P[r] = (code r, code r + 4) of a lane's 8 codes as fp16 bit patterns 1024 + F * code,
// from the 64-bit window (hi:lo) that starts at the lane's first code. Each pair is one LOP3 (the
// mask, and the fp16 exponent OR-ed in) of a register where code r lies in the low half and code
// r + 4 in the high half, both clear of the exponent bits (10..14 of each half); the two halves of
// a pair may sit at different bits (pair_factor's h).
template <int B>
__device__ __forceinline__ void decode_pairs(uint32_t lo, uint32_t hi, uint32_t (&P)[4]) {
    const uint32_t magic = 0x64006400u;
    if constexpr (B == 3) {
        // Code i at bits 3i of lo. Codes (0, 4) sit at bits (4, 16) of lo << 4, (1, 5) at (4, 16) of
        // lo << 1, (2, 6) at (6, 18) of lo itself, (3, 7) at (4, 16) of lo >> 5: one shift per pair,
        // no gather (factors 16 and 1, or 64 and 4 for pair 2).
        P[0] = and_or<0x00070070u>(lo << 4, magic);
        P[1] = and_or<0x00070070u>(lo << 1, magic);
        P[2] = and_or<0x001C01C0u>(lo, magic);
        P[3] = and_or<0x00070070u>(lo >> 5, magic);
    } else if constexpr (B == 5 || B == 6) {
        // Codes 0..3 at bits 0..4B-1 of the window, 4..7 at 4B..8B-1 (into hi): b4 holds 4..7 from
        // bit 0. v1 = low halves of lo and b4 (codes 0, 1 and, at 5 bits, 2); v2 = their bits
        // 8..23 (codes 2 and 3 at 6 bits, code 3 at 5 bits).
        constexpr uint32_t mask = (1u << B) - 1u, m2 = (mask << 16) | mask;
        const uint32_t b4 = __funnelshift_r(lo, hi, 4 * B);
        const uint32_t v1 = __byte_perm(lo, b4, 0x5410), v2 = __byte_perm(lo, b4, 0x6521);
        P[0] = and_or<m2>(v1, magic);
        if constexpr (B == 5) {
            P[1] = and_or<(m2 << 5)>(v1, magic);
            P[2] = and_or<m2>(v1 >> 10, magic);
            P[3] = and_or<m2>(v2 >> 7, magic);
        } else {
            P[1] = and_or<m2>(v1 >> 6, magic);
            P[2] = and_or<(m2 << 4)>(v2, magic);
            P[3] = and_or<m2>(v2 >> 10, magic);
        }
    } else if constexpr (B == 4) {
        const uint32_t h = lo >> 8;
        P[0] = and_or<0x000F000Fu>(lo, magic);
        P[1] = and_or<0x00F000F0u>(lo, magic);
        P[2] = and_or<0x000F000Fu>(h, magic);
        P[3] = and_or<0x00F000F0u>(h, magic);
    } else {
        // 2 bits never come here: lane_pairs gathers them from the word itself (pairs_2bit).
        static_assert(B == 8, "EXL2 bit widths: 2 (pairs_2bit), 3, 4, 5, 6, 8");
#pragma unroll
        for (int r = 0; r < 4; ++r)
            P[r] = and_or<0x00FF00FFu>(__byte_perm(lo, hi, r | (r << 4) | ((4 + r) << 8) | ((4 + r) << 12)), magic);
    }
}

// fp16 bits of a positive integer v < 2048 (exact).
__host__ __device__ constexpr uint32_t half_bits(uint32_t v) {
    int e = 0;
    while ((v >> (e + 1)) != 0u) ++e;
    return (uint32_t)(15 + e) << 10 | ((v << (10 - e)) & 0x3FFu);
}

// Pair r as decode_pairs leaves it (1024 + F * q per half) -> q - 2^(B-1), exactly: one fused
// multiply-add by 1 / F (a power of two, per half) and -(1024 / F + 2^(B-1)), or a subtraction
// where F = 1 in both halves.
template <int B, int R>
__device__ __forceinline__ uint32_t center(uint32_t p) {
    constexpr uint32_t F0 = pair_factor<B>(R, 0), F1 = pair_factor<B>(R, 1);
    constexpr uint32_t bias = half_bits(1024u / F0 + (1u << (B - 1))) | half_bits(1024u / F1 + (1u << (B - 1))) << 16;
    __half2 r;
    if constexpr (F0 == 1 && F1 == 1) {
        r = __hsub2(*reinterpret_cast<const __half2*>(&p), *reinterpret_cast<const __half2*>(&bias));
    } else {
        constexpr uint32_t inv2 = (half_bits(1u) - ((uint32_t)__builtin_ctz(F0) << 10)) |
                                  (half_bits(1u) - ((uint32_t)__builtin_ctz(F1) << 10)) << 16;
        constexpr uint32_t nbias = bias | 0x80008000u;
        r = __hfma2(*reinterpret_cast<const __half2*>(&p), *reinterpret_cast<const __half2*>(&inv2),
                    *reinterpret_cast<const __half2*>(&nbias));
    }
    return *reinterpret_cast<const uint32_t*>(&r);
}

// Column k (0..7) of a lane's window pair: chunk k / 4, word k % 4. CENTER: the pairs hold
// q - 2^(B-1) (exact); otherwise 1024 + F_r * q, and the caller has scaled x's slots of pair r by
// 1 / F_r and subtracts sum over slots of (1024 / F_r + 2^(B-1)) * x.
template <int B, bool CENTER = true>
__device__ __forceinline__ void lane_pairs(const Stage& st, int k, int sh, uint32_t (&P)[4]) {
    const uint32_t w0 = word_of(st.w[0][k >> 2], k & 3), w1 = word_of(st.w[1][k >> 2], k & 3);
    if constexpr (B == 4 || B == 8)  // sh = 8tB mod 32 = 0: the window starts at a word
        decode_pairs<B>(w0, w1, P);
    else if constexpr (B == 2)  // sh = 0 or 16: the window's two bytes lie in w0; one byte permute
        pairs_2bit(__byte_perm(w0, 0u, sh ? 0x3322u : 0x1100u), P);
    else
        decode_pairs<B>(__funnelshift_r(w0, w1, sh), w1 >> sh, P);
    if constexpr (CENTER) {
        P[0] = center<B, 0>(P[0]);
        P[1] = center<B, 1>(P[1]);
        P[2] = center<B, 2>(P[2]);
        P[3] = center<B, 3>(P[3]);
    }
}

// The scale of the lane's column k (0..7) from its two q_scale words.
__device__ __forceinline__ float lane_scale(const Stage& st, int gid, int k, __half smax) {
    const int sh = (gid & 1) * 16 + 4 * (k & 3);
    return exl2_scale((int)((st.sc[k >> 2] >> sh) & 15u) + 1, smax);
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// One unit: tmp[i][tau] += A(tile i) x B(token tile tau) over the unit's 32 rows.
template <int B, int NT, bool CENTER = true>
__device__ __forceinline__ void mma_unit(const Stage& st, int t, const uint4 (&xb)[NT], float (&tmp)[4][NT][4]) {
    const int sh = (8 * t * B) & 31;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint32_t PA[4], PB[4];
        lane_pairs<B, CENTER>(st, 2 * i, sh, PA);
        lane_pairs<B, CENTER>(st, 2 * i + 1, sh, PB);
#pragma unroll
        for (int tau = 0; tau < NT; ++tau) {
            mma16816(tmp[i][tau], PA[0], PB[0], PA[1], PB[1], xb[tau].x, xb[tau].y);
            mma16816(tmp[i][tau], PA[2], PB[2], PA[3], PB[3], xb[tau].z, xb[tau].w);
        }
    }
}

// The accumulator tiles of a lane: 4 column tiles x NT token tiles x 4 mma outputs.
template <int NT>
__device__ __forceinline__ void zero_tiles(float (&a)[4][NT][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int tau = 0; tau < NT; ++tau)
#pragma unroll
            for (int e = 0; e < 4; ++e) a[i][tau][e] = 0.0f;
}

// f(token, column, value) for each of a lane's accumulator elements with token < M: element e of
// column tile i and token tile tau is token 8 tau + 2t + (e & 1) and the lane's column k = 2i + (e >> 1),
// i.e. chunk k / 4, word k % 4 of the 64 columns.
template <int NT, class F>
__device__ __forceinline__ void each_lane_out(const float (&acc)[4][NT][4], int t, int gid, int M, F f) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int tau = 0; tau < NT; ++tau)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 8 * tau + 2 * t + (e & 1), k = 2 * i + (e >> 1);
                if (m < M) f(m, (k < 4 ? 0 : 32) + 4 * gid + (k & 3), acc[i][tau][e]);
            }
}

// Tile i's two scales are byte 2 (gid & 1) + (i & 1) of sc[i / 2] (low nibble: column 2i, high:
// 2i + 1); scale_select(gid) is the byte_perm selector that copies byte 2 (gid & 1) to bytes 0 and 2.
__device__ __forceinline__ uint32_t scale_select(int gid) { return 2u * (uint32_t)(gid & 1) * 0x101u + 0x4040u; }

// End of a group: acc += tmp * the lane's per-column scales, then tmp = 0. The scale is the
// loader's fp16 value half(s*s) * (half(scale_max) * half(1/256)); sc are the lane's two q_scale
// words (columns base + 4*gid + 0..3 and base + 32 + 4*gid + 0..3), sel0 = scale_select(gid).
template <int NT>
__device__ __forceinline__ void finish_group(const uint32_t (&sc)[2], uint32_t sel0, unsigned short smax_bits,
                                             float (&tmp)[4][NT][4], float (&acc)[4][NT][4]) {
    const __half hs = __hmul(__ushort_as_half(smax_bits), __float2half_rn(1.0f / 256.0f));
    const __half2 hs2 = __halves2half2(hs, hs);
    const uint32_t sel1 = sel0 + 0x101u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // Both scales in one register as fp16 (1024 + qa, 1024 + 16 qb), then (qa + 1, qb + 1) by one
        // exact fused multiply-add, squared, times hs: the same fp16 products, rounded once each, as
        // (q + 1)^2 * hs, without integer converts.
        const uint32_t qq = and_or<0x00F0000Fu>(__byte_perm(sc[i >> 1], 0u, (i & 1) ? sel1 : sel0), 0x64006400u);
        const __half2 q1 = __hfma2(*reinterpret_cast<const __half2*>(&qq), __halves2half2(__float2half_rn(1.0f), __float2half_rn(0.0625f)),
                                   __halves2half2(__float2half_rn(-1023.0f), __float2half_rn(-63.0f)));
        const float2 s = __half22float2(__hmul2(__hmul2(q1, q1), hs2));
        const float sa = s.x, sb = s.y;
#pragma unroll
        for (int tau = 0; tau < NT; ++tau) {
            acc[i][tau][0] = fmaf(tmp[i][tau][0], sa, acc[i][tau][0]);
            acc[i][tau][1] = fmaf(tmp[i][tau][1], sa, acc[i][tau][1]);
            acc[i][tau][2] = fmaf(tmp[i][tau][2], sb, acc[i][tau][2]);
            acc[i][tau][3] = fmaf(tmp[i][tau][3], sb, acc[i][tau][3]);
#pragma unroll
            for (int e = 0; e < 4; ++e) tmp[i][tau][e] = 0.0f;
        }
    }
}

}  // namespace exl2cuda
