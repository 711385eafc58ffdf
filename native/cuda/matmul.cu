// Dequantization of a packed EXL2 linear and the fused dequant-and-multiply for small M.
//
// exl2_matmul (y[M, N] = x[M, K] @ W, x in original channel order):
//  * A block owns 32*CPT columns (one column per lane and CPT adjacent columns per lane, so a
//    warp reads whole 128-byte lines of every q_weight row) and one m-tile of MT rows of x.
//  * K is split over ks blocks of a thread-block cluster (sm_90) by 32-row units; inside a
//    block the 8 warps split the block's units again. The partial sums are reduced through
//    shared memory and then, deterministically, through distributed shared memory.
//  * The block first builds the group table from q_groups (prefix sums, shared memory) and
//    stages x[:, perm] for its rows in shared memory as f32, [row][MT].
//  * Codes are turned into floats with one shift and one LOP3: f = 1 + q/2^b (the code's bits
//    placed in the mantissa). Inside a group, acc_g = sum f*x; since q - 2^(b-1) = 2^b (f - 1.5),
//    the group adds scale*2^b*(acc_g - 1.5*sum x) to the result. The scale is the loader's fp16
//    value; accumulation is f32.
//  * Each warp keeps 2-4 units of q_weight loads in flight and L2-prefetches its first units while
//    x is staged. Measured on an H200 (benchmarks/RESULTS.md): ~25 % of copy bandwidth at M = 1,
//    issue- and latency-bound (about 3 SIMT instructions per weight); the next step is a
//    tensor-core (mma.sync) inner loop and one x[:, perm] gather per call instead of per block.

#include <algorithm>

#include "common.cuh"
#include "kernels_cuda.cuh"
#include "matmul_tc.cuh"


namespace exl2cuda {

namespace {

constexpr int MATMUL_SHALLOW = 1;          // one unit of loads in flight per warp (first version)
constexpr int MATMUL_NO_L2_PREFETCH = 2;   // skip the L2 prefetch of the warp's first units
constexpr int MATMUL_FULL_L2_PREFETCH = 4; // L2-prefetch all of the warp's units (second version)
constexpr int MATMUL_SIMT = 8;            // the SIMT kernel even where the tensor-core one applies
constexpr int MATMUL_TC = 16;             // the tensor-core kernel wherever it applies (also M = 1)
constexpr int PREFETCH_UNITS = 2;          // units prefetched to L2 while x is staged (default)

// Code i (compile-time after unrolling) of a 32-row unit of B words, as 1 + q/2^B.
template <int B>
__device__ __forceinline__ float code_f(const uint32_t (&w)[B], const int i) {
    constexpr int P = 23 - B;
    const int o = i * B, j = o >> 5, s = o & 31;
    uint32_t t;
    if (s + B <= 32)
        t = (s >= P) ? (w[j] >> (s - P)) : (w[j] << (P - s));
    else
        t = __funnelshift_r(w[j], w[(j + 1) < B ? (j + 1) : j], s - P);
    return __uint_as_float((t & (((1u << B) - 1u) << P)) | 0x3F800000u);
}

template <int CPT>
__device__ __forceinline__ void load_cols(const uint32_t* p, uint32_t (&v)[CPT], bool valid) {
    if constexpr (CPT == 1) {
        v[0] = valid ? __ldg(p) : 0u;
    } else {
        uint2 t = valid ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0u, 0u);
        v[0] = t.x;
        v[1] = t.y;
    }
}

// One full 32-row unit: w[c][j] is word j of the unit for column c; xr = x rows [32][MT].
template <int B, int MT, int CPT>
__device__ __forceinline__ void do_unit(const uint32_t (&w)[CPT][B], const float* __restrict__ xr,
                                        float (&acc)[CPT][MT]) {
    constexpr int RX = MT >= 4 ? 1 : 4 / MT;  // rows per x load of (RX*MT) floats, a float4 multiple
    constexpr int NV = (RX * MT) / 4;
    // NP independent partial sums per output break the FFMA dependency chain (small MT).
    constexpr int NP = MT <= 1 ? 4 : (MT <= 2 ? 2 : 1);
    float part[NP][CPT][MT];
#pragma unroll
    for (int q = 0; q < NP; ++q)
#pragma unroll
        for (int c = 0; c < CPT; ++c)
#pragma unroll
            for (int m = 0; m < MT; ++m) part[q][c][m] = 0.0f;
#pragma unroll
    for (int i0 = 0; i0 < 32; i0 += RX) {
        float xv[RX * MT];
#pragma unroll
        for (int q = 0; q < NV; ++q) {
            const float4 t = reinterpret_cast<const float4*>(xr + i0 * MT)[q];
            xv[4 * q] = t.x;
            xv[4 * q + 1] = t.y;
            xv[4 * q + 2] = t.z;
            xv[4 * q + 3] = t.w;
        }
#pragma unroll
        for (int ii = 0; ii < RX; ++ii)
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                const float f = code_f<B>(w[c], i0 + ii);
#pragma unroll
                for (int m = 0; m < MT; ++m)
                    part[(i0 + ii) % NP][c][m] = fmaf(f, xv[ii * MT + m], part[(i0 + ii) % NP][c][m]);
            }
    }
#pragma unroll
    for (int c = 0; c < CPT; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float t = part[0][c][m];
#pragma unroll
            for (int q = 1; q < NP; ++q) t += part[q][c][m];
            acc[c][m] += t;
        }
}

// nunits full units of one group, words prefetched one unit ahead.
template <int B, int MT, int CPT>
__device__ __forceinline__ void do_units(const uint32_t* __restrict__ p, int64_t n_pad, int nunits,
                                         const float* __restrict__ xb, float (&acc)[CPT][MT], bool valid) {
    if (nunits <= 0) return;
    uint32_t cur[CPT][B], nxt[CPT][B];
#pragma unroll
    for (int j = 0; j < B; ++j) {
        uint32_t v[CPT];
        load_cols<CPT>(p + j * n_pad, v, valid);
#pragma unroll
        for (int c = 0; c < CPT; ++c) cur[c][j] = v[c];
    }
    for (int u = 0; u < nunits; ++u) {
        const bool more = valid && (u + 1 < nunits);
#pragma unroll
        for (int j = 0; j < B; ++j) {
            uint32_t v[CPT];
            load_cols<CPT>(p + ((int64_t)(u + 1) * B + j) * n_pad, v, more);
#pragma unroll
            for (int c = 0; c < CPT; ++c) nxt[c][j] = v[c];
        }
        do_unit<B, MT, CPT>(cur, xb + (int64_t)u * 32 * MT, acc);
#pragma unroll
        for (int j = 0; j < B; ++j)
#pragma unroll
            for (int c = 0; c < CPT; ++c) cur[c][j] = nxt[c][j];
    }
}

template <int B, int CPT>
__device__ __forceinline__ void load_unit(const uint32_t* __restrict__ p, int64_t n_pad, int u,
                                          uint32_t (&dst)[CPT][B], bool pred) {
#pragma unroll
    for (int j = 0; j < B; ++j) {
        uint32_t v[CPT];
        load_cols<CPT>(p + ((int64_t)u * B + j) * n_pad, v, pred);
#pragma unroll
        for (int c = 0; c < CPT; ++c) dst[c][j] = v[c];
    }
}

// nunits full units of one group with D (2..4) units of loads in flight.
template <int B, int MT, int CPT>
__device__ __forceinline__ void do_units_deep(const uint32_t* __restrict__ p, int64_t n_pad, int nunits,
                                              const float* __restrict__ xb, float (&acc)[CPT][MT], bool valid) {
    constexpr int D0 = 16 / (B * CPT);
    constexpr int D = D0 < 2 ? 2 : (D0 > 4 ? 4 : D0);
    if (nunits <= 0) return;
    uint32_t buf[D][CPT][B];
#pragma unroll
    for (int s = 0; s < D; ++s) load_unit<B, CPT>(p, n_pad, s, buf[s], valid && s < nunits);
    for (int u = 0; u < nunits; u += D) {
#pragma unroll
        for (int s = 0; s < D; ++s) {
            if (u + s < nunits) {
                do_unit<B, MT, CPT>(buf[s], xb + (int64_t)(u + s) * 32 * MT, acc);
                load_unit<B, CPT>(p, n_pad, u + s + D, buf[s], valid && (u + s + D < nunits));
            }
        }
    }
}

// A short unit (fewer than 32 rows: the last unit of a group), any bit width.
template <int MT, int CPT>
__device__ __forceinline__ void do_short_unit(const uint32_t* __restrict__ p, int64_t n_pad, int b, int rows,
                                              const float* __restrict__ xr, float (&acc)[CPT][MT], bool valid) {
    if (!valid) return;
    const uint32_t mask = (1u << b) - 1u;
    const float inv = 1.0f / (float)(1 << b);
    for (int r = 0; r < rows; ++r) {
        const int o = r * b, j = o >> 5, s = o & 31;
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            uint32_t v = __ldg(p + (int64_t)j * n_pad + c) >> s;
            if (s + b > 32) v |= __ldg(p + (int64_t)(j + 1) * n_pad + c) << (32 - s);
            const float f = 1.0f + (float)(v & mask) * inv;
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[c][m] = fmaf(f, xr[r * MT + m], acc[c][m]);
        }
    }
}

__host__ __device__ inline int64_t align4(int64_t v) { return (v + 3) / 4 * 4; }

template <int MT, int CPT, bool F16>
__global__ void __launch_bounds__(256, (MT <= 2 ? (CPT == 1 ? 4 : 3) : (MT <= 8 ? 2 : 1))) exl2_matmul_kernel(
    const void* __restrict__ x, const uint32_t* __restrict__ qw, const int32_t* __restrict__ qs,
    const __half* __restrict__ qsm, const int16_t* __restrict__ qg, const int32_t* __restrict__ perm,
    void* __restrict__ y, int M, int K, int N, int n_pad, int G, int ks, int flags) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int* tbl = reinterpret_cast<int*>(smem_raw);
    float* xs = reinterpret_cast<float*>(tbl + align4(group_table_ints(G)));
    const GroupTable gt = build_group_table(qg, G, K, tbl);
    const int U = gt.unit[G];
    const int rank = blockIdx.y;
    const int ub = (int)((int64_t)U * rank / ks), ue = (int)((int64_t)U * (rank + 1) / ks);
    int kr0 = 0, kr1 = 0;
    if (ue > ub) {
        const int g0 = find_le(gt.unit, G, ub);
        kr0 = gt.row[g0] + (ub - gt.unit[g0]) * 32;
        const int g1 = find_le(gt.unit, G, ue - 1);
        kr1 = min(gt.row[g1] + (ue - 1 - gt.unit[g1]) * 32 + 32, gt.row[g1 + 1]);
    }
    const int nrows = kr1 - kr0;
    const int m0 = blockIdx.z * MT;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int wu0 = ub + (int)((int64_t)(ue - ub) * warp / nw);
    const int wu1 = ub + (int)((int64_t)(ue - ub) * (warp + 1) / nw);
    const int n = blockIdx.x * (32 * CPT) + lane * CPT;
    const bool valid = n < n_pad;

    // Start pulling this warp's first weights into L2 while x is staged.
    if (!(flags & MATMUL_NO_L2_PREFETCH) && valid && wu1 > wu0) {
        int g = find_le(gt.unit, G, wu0);
        const int pu1 = (flags & MATMUL_FULL_L2_PREFETCH) ? wu1 : min(wu1, wu0 + PREFETCH_UNITS);
        for (int u = wu0; u < pu1; ++u) {
            while (gt.unit[g + 1] <= u) ++g;
            const int b = gt.bits[g];
            const uint32_t* p = qw + (int64_t)(gt.qrow[g] + (u - gt.unit[g]) * b) * n_pad + n;
            const int rows = min(32, gt.row[g + 1] - gt.row[g] - (u - gt.unit[g]) * 32);
            const int words = (rows * b + 31) / 32;
            for (int j = 0; j < words; ++j) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + (int64_t)j * n_pad));
        }
    }

    // Stage x[m0 + m, perm[k]] for this block's rows, 8 independent gathers per thread in flight.
    {
        const int total = nrows * MT;
        for (int base = 0; base < total; base += 8 * (int)blockDim.x) {
            int src[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const int i = base + q * blockDim.x + threadIdx.x;
                src[q] = i < total ? __ldg(perm + kr0 + i / MT) : -1;
            }
            float v[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const int i = base + q * blockDim.x + threadIdx.x;
                const int mm = m0 + i % MT;
                v[q] = 0.0f;
                if (src[q] >= 0 && mm < M) {
                    const int64_t o = (int64_t)mm * K + src[q];
                    v[q] = F16 ? __half2float(__ldg(reinterpret_cast<const __half*>(x) + o))
                               : __ldg(reinterpret_cast<const float*>(x) + o);
                }
            }
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const int i = base + q * blockDim.x + threadIdx.x;
                if (i < total) xs[i] = v[q];
            }
        }
    }
    __syncthreads();
    float acc[CPT][MT];
#pragma unroll
    for (int c = 0; c < CPT; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[c][m] = 0.0f;

    int u = wu0;
    int g = wu1 > wu0 ? find_le(gt.unit, G, u) : 0;
    while (u < wu1) {
        while (gt.unit[g + 1] <= u) ++g;
        const int b = gt.bits[g];
        const int gu0 = gt.unit[g], gu1 = gt.unit[g + 1];
        const int grow0 = gt.row[g], grows = gt.row[g + 1] - grow0;
        const int seg_end = min(wu1, gu1);
        const int full_end = min(seg_end, gu0 + grows / 32);
        const int lu = u - gu0;
        float accg[CPT][MT];
#pragma unroll
        for (int c = 0; c < CPT; ++c)
#pragma unroll
            for (int m = 0; m < MT; ++m) accg[c][m] = 0.0f;
        const uint32_t* p = qw + (int64_t)(gt.qrow[g] + lu * b) * n_pad + n;
        const float* xb = xs + (int64_t)(grow0 + lu * 32 - kr0) * MT;
        const int nfull = max(0, full_end - u);
        if (flags & MATMUL_SHALLOW) {
            switch (b) {
                case 2: do_units<2, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 3: do_units<3, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 4: do_units<4, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 5: do_units<5, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 6: do_units<6, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 8: do_units<8, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                default: break;
            }
        } else {
            switch (b) {
                case 2: do_units_deep<2, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 3: do_units_deep<3, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 4: do_units_deep<4, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 5: do_units_deep<5, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 6: do_units_deep<6, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                case 8: do_units_deep<8, MT, CPT>(p, n_pad, nfull, xb, accg, valid); break;
                default: break;
            }
        }
        if (seg_end > full_end) {  // the group's short last unit belongs to this segment
            const int lp = grows / 32;
            do_short_unit<MT, CPT>(qw + (int64_t)(gt.qrow[g] + lp * b) * n_pad + n, n_pad, b, grows - lp * 32,
                                   xs + (int64_t)(grow0 + lp * 32 - kr0) * MT, accg, valid);
        }
        // sum of x over the segment's rows (lanes in parallel, then a butterfly)
        const int rs = grow0 + lu * 32 - kr0;
        const int re = min(grow0 + (seg_end - gu0) * 32, grow0 + grows) - kr0;
        float sx[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) sx[m] = 0.0f;
        for (int r = rs + lane; r < re; r += 32)
#pragma unroll
            for (int m = 0; m < MT; ++m) sx[m] += xs[(int64_t)r * MT + m];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sx[m] += __shfl_xor_sync(0xffffffffu, sx[m], o);
        if (valid) {
            const __half smax = qsm[g];
            const float two_b = (float)(1 << b);
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                const float sc = exl2_scale(scale_code(qs, g, n + c, n_pad), smax) * two_b;
#pragma unroll
                for (int m = 0; m < MT; ++m) acc[c][m] = fmaf(sc, fmaf(-1.5f, sx[m], accg[c][m]), acc[c][m]);
            }
        }
        u = seg_end;
        ++g;
    }

    // Reduce the warps' partial sums, then the cluster's blocks.
    constexpr int NO = MT * 32 * CPT;
    __syncthreads();
    float* red = xs;  // [nw][NO]
#pragma unroll
    for (int c = 0; c < CPT; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) red[warp * NO + m * 32 * CPT + lane * CPT + c] = acc[c][m];
    __syncthreads();
    float* part = red + nw * NO;
    for (int i = threadIdx.x; i < NO; i += blockDim.x) {
        float t = 0.0f;
        for (int w = 0; w < nw; ++w) t += red[w * NO + i];
        part[i] = t;
    }
    auto write_out = [&](int i, float v) {
        const int m = i / (32 * CPT), col = i % (32 * CPT);
        const int nn = blockIdx.x * (32 * CPT) + col, mm = m0 + m;
        if (mm < M && nn < N) {
            if (F16)
                reinterpret_cast<__half*>(y)[(int64_t)mm * N + nn] = __float2half_rn(v);
            else
                reinterpret_cast<float*>(y)[(int64_t)mm * N + nn] = v;
        }
    };
    if (ks == 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < NO; i += blockDim.x) write_out(i, part[i]);
    } else {
        cluster_reduce(part, NO, ks, (int)blockDim.x, write_out);
    }
}

template <bool F16>
__global__ void __launch_bounds__(256) dequant_kernel(const uint32_t* __restrict__ qw, const int32_t* __restrict__ qs,
                                                      const __half* __restrict__ qsm, const int16_t* __restrict__ qg,
                                                      const int32_t* __restrict__ invperm, void* __restrict__ out,
                                                      int K, int N, int n_pad, int G) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const GroupTable gt = build_group_table(qg, G, K, reinterpret_cast<int*>(smem_raw));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int n = blockIdx.x * 64 + lane * 2;
    if (n >= n_pad) return;  // no block-wide sync below
    constexpr int R = 4;  // output rows per warp and step, loads issued together
    const int stride = gridDim.y * nw;
    for (int k0 = blockIdx.y * nw + warp; k0 < K; k0 += R * stride) {
        int g[R], s[R], b[R];
        uint2 w0[R], w1[R];
#pragma unroll
        for (int q = 0; q < R; ++q) {
            const int k = k0 + q * stride;
            const int r = k < K ? __ldg(invperm + k) : 0;
            g[q] = find_le(gt.row, G, r);
            b[q] = gt.bits[g[q]];
            const int o = (r - gt.row[g[q]]) * b[q], j = o >> 5;
            s[q] = o & 31;
            const uint32_t* p = qw + (int64_t)(gt.qrow[g[q]] + j) * n_pad + n;
            w0[q] = k < K ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0u, 0u);
            w1[q] = (k < K && s[q] + b[q] > 32) ? __ldg(reinterpret_cast<const uint2*>(p + n_pad)) : make_uint2(0u, 0u);
        }
#pragma unroll
        for (int q = 0; q < R; ++q) {
            const int k = k0 + q * stride;
            if (k >= K) break;
            uint32_t v0 = w0[q].x >> s[q], v1 = w0[q].y >> s[q];
            if (s[q] + b[q] > 32) {
                v0 |= w1[q].x << (32 - s[q]);
                v1 |= w1[q].y << (32 - s[q]);
            }
            const uint32_t mask = (1u << b[q]) - 1u;
            const float zero = (float)(1 << (b[q] - 1));
            const __half smax = qsm[g[q]];
            const float d0 = ((float)(v0 & mask) - zero) * exl2_scale(scale_code(qs, g[q], n, n_pad), smax);
            const float d1 = ((float)(v1 & mask) - zero) * exl2_scale(scale_code(qs, g[q], n + 1, n_pad), smax);
            const int64_t o0 = (int64_t)k * N + n;
            if (F16) {
                __half* dst = reinterpret_cast<__half*>(out);
                if (n + 1 < N && (N & 1) == 0) {
                    *reinterpret_cast<__half2*>(dst + o0) = __halves2half2(__float2half_rn(d0), __float2half_rn(d1));
                } else {
                    if (n < N) dst[o0] = __float2half_rn(d0);
                    if (n + 1 < N) dst[o0 + 1] = __float2half_rn(d1);
                }
            } else {
                float* dst = reinterpret_cast<float*>(out);
                if (n < N) dst[o0] = d0;
                if (n + 1 < N) dst[o0 + 1] = d1;
            }
        }
    }
}

struct DevInfo {
    int sms = 0, major = 0, smem_optin = 0, smem_sm = 0, smem_reserved = 0;
};

DevInfo dev_info() {
    static thread_local int cached_dev = -1;
    static thread_local DevInfo cached;
    int dev = 0;
    check(cudaGetDevice(&dev), "device query");
    if (dev != cached_dev) {
        DevInfo d;
        check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "device query");
        check(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev), "device query");
        check(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "device query");
        check(cudaDeviceGetAttribute(&d.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev), "device query");
        check(cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev), "device query");
        cached = d;
        cached_dev = dev;
    }
    return cached;
}

template <int MT, int CPT, bool F16>
void launch_matmul(const void* x, const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
                   const int16_t* q_groups, const int32_t* q_perm, void* y, int M, int K, int N, int n_pad, int G,
                   int ks, int mtiles, size_t smem, cudaStream_t st, int flags) {
    auto kern = exl2_matmul_kernel<MT, CPT, F16>;
    if (smem > 48 * 1024)
        check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "exl2_matmul");
    const int ntiles = (n_pad + 32 * CPT - 1) / (32 * CPT);
    launch_k_split(kern, dim3(ntiles, ks, mtiles), 256, smem, st, ks, "exl2_matmul", false, x,
                   reinterpret_cast<const uint32_t*>(q_weight), q_scale, reinterpret_cast<const __half*>(q_scale_max),
                   q_groups, q_perm, y, M, K, N, n_pad, G, ks, flags);
}

template <int CPT, bool F16>
void dispatch_mt(int MT, const void* x, const int32_t* qw, const int32_t* qs, const uint16_t* qsm, const int16_t* qg,
                 const int32_t* perm, void* y, int M, int K, int N, int n_pad, int G, int ks, int mtiles, size_t smem,
                 cudaStream_t st, int flags) {
    switch (MT) {
        case 1: launch_matmul<1, CPT, F16>(x, qw, qs, qsm, qg, perm, y, M, K, N, n_pad, G, ks, mtiles, smem, st, flags); break;
        case 2: launch_matmul<2, CPT, F16>(x, qw, qs, qsm, qg, perm, y, M, K, N, n_pad, G, ks, mtiles, smem, st, flags); break;
        case 4: launch_matmul<4, CPT, F16>(x, qw, qs, qsm, qg, perm, y, M, K, N, n_pad, G, ks, mtiles, smem, st, flags); break;
        case 8: launch_matmul<8, CPT, F16>(x, qw, qs, qsm, qg, perm, y, M, K, N, n_pad, G, ks, mtiles, smem, st, flags); break;
        default: launch_matmul<16, CPT, F16>(x, qw, qs, qsm, qg, perm, y, M, K, N, n_pad, G, ks, mtiles, smem, st, flags); break;
    }
}

}  // namespace

int device_sm_count() { return dev_info().sms; }
int device_cc_major() { return dev_info().major; }
int device_smem_optin() { return dev_info().smem_optin; }
int device_smem_per_sm() { return dev_info().smem_sm; }
int device_smem_reserved() { return dev_info().smem_reserved; }

void exl2_matmul(const void* x, const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
                 const int16_t* q_groups, const int32_t* q_perm, void* y, int64_t M, int64_t K, int64_t N,
                 int64_t n_pad, int64_t G, bool io_is_f16, uintptr_t stream, int cols_per_thread, int k_splits, int flags) {
    if (M <= 0 || N <= 0) return;
    if (K >= (1LL << 30) || N >= (1LL << 30) || M * K >= (1LL << 40) || G <= 0)
        throw std::runtime_error("exl2_matmul: sizes out of range");
    if (n_pad % 32) throw std::runtime_error("exl2_matmul: n_pad must be a multiple of 32");
    const DevInfo di = dev_info();
    // M = 1 stays on the SIMT kernel: on the H200 it beat the tensor-core kernel there (28 vs 35 us
    // at 4096x14336, 4.0 bpw; benchmarks/RESULTS.md), while the tensor-core kernel wins 2-3.6x at M >= 8.
    const bool want_tc = (flags & MATMUL_TC) || (M >= 2 && !(flags & MATMUL_SIMT));
    if (io_is_f16 && want_tc &&
        exl2_matmul_tc(x, q_weight, q_scale, q_scale_max, q_groups, q_perm, y, M, K, N, n_pad, G, stream, di.sms,
                       di.major, di.smem_optin, k_splits))
        return;
    const int cpt = cols_per_thread > 0 ? (cols_per_thread >= 2 ? 2 : 1) : (n_pad >= 2048 ? 2 : 1);
    int MT = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16;
    const int64_t u_bound = (K + 31) / 32 + G;
    const int64_t tbl_bytes = align4(group_table_ints(G)) * 4;
    for (;;) {
        const int mtiles = (int)((M + MT - 1) / MT);
        const int64_t ntiles = (n_pad + 32 * cpt - 1) / (32 * cpt);
        int ks = 1;
        const int ks_max = di.major >= 9 ? 8 : 1;
        if (k_splits > 0) {
            ks = std::min(k_splits, ks_max);
        } else if (ks_max > 1) {
            // About one block per SM before splitting K (H200 sweep: fewer, fuller blocks win;
            // a partial second wave costs more than it saves).
            ks = (int)std::min<int64_t>(ks_max, std::max<int64_t>(1, (di.sms + (ntiles * mtiles) / 2) / (ntiles * mtiles)));
            ks = (int)std::min<int64_t>(ks, std::max<int64_t>(1, K / 32 / 8));
        }
        auto smem_for = [&](int k) {
            const int64_t rows = 32 * ((u_bound + k - 1) / k);
            const int64_t floats = std::max<int64_t>(rows * MT, 9LL * MT * 32 * cpt);
            return (size_t)(tbl_bytes + floats * 4);
        };
        while (smem_for(ks) > (size_t)di.smem_optin && ks < ks_max) ++ks;
        const size_t smem = smem_for(ks);
        if (smem <= (size_t)di.smem_optin) {
            cudaStream_t st = as_stream(stream);
            if (cpt == 1) {
                if (io_is_f16) dispatch_mt<1, true>(MT, x, q_weight, q_scale, q_scale_max, q_groups, q_perm, y, (int)M, (int)K, (int)N, (int)n_pad, (int)G, ks, mtiles, smem, st, flags);
                else dispatch_mt<1, false>(MT, x, q_weight, q_scale, q_scale_max, q_groups, q_perm, y, (int)M, (int)K, (int)N, (int)n_pad, (int)G, ks, mtiles, smem, st, flags);
            } else {
                if (io_is_f16) dispatch_mt<2, true>(MT, x, q_weight, q_scale, q_scale_max, q_groups, q_perm, y, (int)M, (int)K, (int)N, (int)n_pad, (int)G, ks, mtiles, smem, st, flags);
                else dispatch_mt<2, false>(MT, x, q_weight, q_scale, q_scale_max, q_groups, q_perm, y, (int)M, (int)K, (int)N, (int)n_pad, (int)G, ks, mtiles, smem, st, flags);
            }
            return;
        }
        if (MT == 1) throw std::runtime_error("exl2_matmul: K=" + std::to_string(K) + " too large for shared memory");
        MT /= 2;
    }
}

void dequant(const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max, const int16_t* q_groups,
             const int32_t* q_invperm, void* out, int64_t K, int64_t N, int64_t n_pad, int64_t G, bool out_is_f16,
             uintptr_t stream) {
    if (K <= 0 || N <= 0) return;
    if (G <= 0 || n_pad % 32) throw std::runtime_error("dequant: need G > 0 and n_pad a multiple of 32");
    const DevInfo di = dev_info();
    const size_t smem = (size_t)align4(group_table_ints(G)) * 4;
    if (smem > (size_t)di.smem_optin) throw std::runtime_error("dequant: too many groups");
    const unsigned gx = (unsigned)cdiv(n_pad, 64);
    // 8 warps x 4 rows per step: about two steps per warp.
    const unsigned gy = (unsigned)std::min<int64_t>(std::max<int64_t>(1, cdiv(K, 64)), 65535);
    cudaStream_t st = as_stream(stream);
    if (out_is_f16) {
        if (smem > 48 * 1024)
            check(cudaFuncSetAttribute(dequant_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "dequant");
        dequant_kernel<true><<<dim3(gx, gy), 256, smem, st>>>(reinterpret_cast<const uint32_t*>(q_weight), q_scale,
                                                             reinterpret_cast<const __half*>(q_scale_max), q_groups,
                                                             q_invperm, out, (int)K, (int)N, (int)n_pad, (int)G);
    } else {
        if (smem > 48 * 1024)
            check(cudaFuncSetAttribute(dequant_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "dequant");
        dequant_kernel<false><<<dim3(gx, gy), 256, smem, st>>>(reinterpret_cast<const uint32_t*>(q_weight), q_scale,
                                                              reinterpret_cast<const __half*>(q_scale_max), q_groups,
                                                              q_invperm, out, (int)K, (int)N, (int)n_pad, (int)G);
    }
    check_launch("dequant");
}

}  // namespace exl2cuda
