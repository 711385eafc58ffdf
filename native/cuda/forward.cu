// The forward pass's small f16 operations, fused (serves exl2build/model/forward.py on CUDA).
//
// A batch-1 decode step of a 7B-shaped model spent ~1.5 ms of its ~4.6 ms of GPU time outside
// the matmuls, in ~19 torch kernels per layer of 1-5 us each: RMSNorm alone was three (cast to
// f32, the norm, cast back), RoPE six, the cache writes two (benchmarks/decode_ops.py). These
// kernels do the same arithmetic in one launch each, rounding where torch rounds:
//  * rms_norm: out = f16(h * rsqrt(mean(h^2) + eps) * w) in f32, optionally after the residual
//    add h = f16(x + r), written back as the new residual stream;
//  * rope_cache: RoPE of q (in place) and k in the rotate-half form with a sign-folded sin
//    table (f16(f16(x * cos) + x_rolled * sin), as torch's mul + addcmul), k and v stored into
//    the KV cache at their positions;
//  * silu_mul: f16(f16(silu(g)) * u), as torch's silu then mul;
//  * decode_attention: softmax(q k^T / sqrt(D)) v of one new token over the stored keys, in f32
//    (the CUDA-graph decode step's attention; SDPA's rounding differs, within 1e-2 relative).
// Each lets the next kernel start at once (programmatic dependent launch): the matmul that follows
// prefetches its weights while this one runs and waits for it before reading its output. Each is
// launched early in the same way (launch_early) and waits for the previous kernel before it reads
// an activation or writes anything, so its start-up overlaps that kernel's tail instead of
// following it (the norm loads its weights before the wait).
// The norm's f32 sum runs in a different order than torch's, so its outputs may differ from
// torch's in the last bit; rope_cache and silu_mul match torch bit for bit.

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "kernels_cuda.cuh"

namespace exl2cuda {

namespace {

constexpr int NORM_THREADS = 256;

// The sum of every thread's v over a block of NORM_THREADS (warp shuffles, then the warps' sums
// in a fixed order).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[NORM_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float tot = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) tot += part[i];
    return tot;
}

// One block per row. The row is read twice (sum of squares, then scaling); the second read hits
// L1/L2 (a row is at most a few tens of KB).
__global__ void __launch_bounds__(NORM_THREADS) rms_norm_kernel(const __half* __restrict__ x,
                                                                const __half* __restrict__ r,
                                                                const float* __restrict__ w,
                                                                __half* __restrict__ out, __half* h_out, int dim,
                                                                float eps) {
    grid_dependents_launch();  // a following matmul may start prefetching its weights now
    grid_dependency_wait();    // launched early itself: x and r may still be being written
    const int64_t row = blockIdx.x;
    const __half* xr = x + row * dim;
    const __half* rr = r ? r + row * dim : nullptr;
    __half* hr = h_out ? h_out + row * dim : nullptr;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) {
        __half h = xr[i];
        if (rr) {
            h = __float2half_rn(__half2float(h) + __half2float(rr[i]));
            hr[i] = h;  // read back below by this same thread
        }
        const float f = __half2float(h);
        ss += f * f;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    const __half* src = rr ? hr : xr;
    __half* o = out + row * dim;
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) o[i] = __float2half_rn(__half2float(src[i]) * inv * w[i]);
}

// The same with the row held in registers: each thread owns up to V chunks of 8 halves (16-byte
// loads and stores), so the row is read once. dim % 8 == 0 and 16-byte aligned rows; dim <= V * 8 * 256.
template <int V>
__global__ void __launch_bounds__(NORM_THREADS) rms_norm_vec_kernel(const __half* __restrict__ x,
                                                                    const __half* __restrict__ r,
                                                                    const float* __restrict__ w,
                                                                    __half* __restrict__ out, __half* h_out, int dim,
                                                                    float eps) {
    grid_dependents_launch();
    const int64_t row = blockIdx.x;
    const int chunks = dim / 8;
    // The weights are constants: their loads go out before the wait for the previous kernel.
    float4 wv[V][2];
#pragma unroll
    for (int c = 0; c < V; ++c) {
        const int i = threadIdx.x + c * NORM_THREADS;
        if (i >= chunks) break;
        wv[c][0] = reinterpret_cast<const float4*>(w)[2 * i];
        wv[c][1] = reinterpret_cast<const float4*>(w)[2 * i + 1];
    }
    grid_dependency_wait();
    uint4 h[V];
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < V; ++c) {
        const int i = threadIdx.x + c * NORM_THREADS;
        if (i >= chunks) break;
        const int64_t off = row * chunks + i;
        h[c] = reinterpret_cast<const uint4*>(x)[off];
        __half2* hv = reinterpret_cast<__half2*>(&h[c]);
        if (r) {
            const uint4 rv = reinterpret_cast<const uint4*>(r)[off];
            const __half2* rh = reinterpret_cast<const __half2*>(&rv);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 a = __half22float2(hv[e]), b = __half22float2(rh[e]);
                hv[e] = __floats2half2_rn(a.x + b.x, a.y + b.y);
            }
            reinterpret_cast<uint4*>(h_out)[off] = h[c];
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(hv[e]);
            ss += f.x * f.x + f.y * f.y;
        }
    }
    const float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
#pragma unroll
    for (int c = 0; c < V; ++c) {
        const int i = threadIdx.x + c * NORM_THREADS;
        if (i >= chunks) break;
        const float4 w0 = wv[c][0], w1 = wv[c][1];
        const float ws[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
        const __half2* hv = reinterpret_cast<const __half2*>(&h[c]);
        uint4 o;
        __half2* ov = reinterpret_cast<__half2*>(&o);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(hv[e]);
            ov[e] = __floats2half2_rn(f.x * inv * ws[2 * e], f.y * inv * ws[2 * e + 1]);
        }
        reinterpret_cast<uint4*>(out)[row * chunks + i] = o;
    }
}

// rotate-half RoPE of one element: f16(f16(x * cos) + partner * sin), partner = x[(i + D/2) % D]
// (sin with its first half negated). One function for rope_cache and the fused decode attention,
// so both round alike.
__device__ __forceinline__ __half rope_one(__half x, __half partner, __half c, __half s) {
    const float xc = __half2float(__float2half_rn(__half2float(x) * __half2float(c)));
    return __float2half_rn(xc + __half2float(partner) * __half2float(s));
}

__device__ __forceinline__ __half rope_at(const __half* head, const __half* cs, const __half* sn, int i, int D) {
    return rope_one(head[i], head[i < D / 2 ? i + D / 2 : i - D / 2], cs[i], sn[i]);
}

// Dims 8c .. 8c + 7 of a head (16 bytes at `at`, the rotation partners at `partner`), roped with the
// same dims of the position's cos / sin rows.
__device__ __forceinline__ uint4 rope8(const __half* at, const __half* partner, const __half* cs, const __half* sn) {
    const uint4 x = *reinterpret_cast<const uint4*>(at), y = *reinterpret_cast<const uint4*>(partner);
    const uint4 c = *reinterpret_cast<const uint4*>(cs), s = *reinterpret_cast<const uint4*>(sn);
    const __half *hx = reinterpret_cast<const __half*>(&x), *hy = reinterpret_cast<const __half*>(&y);
    const __half *hc = reinterpret_cast<const __half*>(&c), *hs = reinterpret_cast<const __half*>(&s);
    uint4 r;
    __half* hr = reinterpret_cast<__half*>(&r);
#pragma unroll
    for (int e = 0; e < 8; ++e) hr[e] = rope_one(hx[e], hy[e], hc[e], hs[e]);
    return r;
}

// Grid (B * T, H + 2 * Hkv): one block per token and head; y < H: a query head (in place),
// H <= y < H + Hkv: a key head (roped into the cache), else a value head (copied into the cache).
// q [B*T, H*D], k and v [B*T, Hkv*D]; cos/sin [T, D]; caches [B, Hkv, max_len, D].
__global__ void rope_cache_kernel(__half* q, const __half* __restrict__ k, const __half* __restrict__ v,
                                  const __half* __restrict__ cos_t, const __half* __restrict__ sin_t,
                                  __half* __restrict__ k_cache, __half* __restrict__ v_cache,
                                  const int64_t* __restrict__ pos, int64_t start, int T, int H, int Hkv, int D,
                                  int64_t max_len) {
    grid_dependents_launch();
    grid_dependency_wait();
    const int bt = blockIdx.x, t = bt % T, b = bt / T, y = blockIdx.y;
    const __half* cs = cos_t + (int64_t)t * D;
    const __half* sn = sin_t + (int64_t)t * D;
    if (y < H) {
        __half* head = q + ((int64_t)bt * H + y) * D;
        // Every element reads its rotation partner: read all, sync, then write.
        __half vals[4];
        int n = 0;
        for (int i = threadIdx.x; i < D; i += blockDim.x) vals[n++] = rope_at(head, cs, sn, i, D);
        __syncthreads();
        n = 0;
        for (int i = threadIdx.x; i < D; i += blockDim.x) head[i] = vals[n++];
        return;
    }
    const bool is_k = y < H + Hkv;
    const int h = is_k ? y - H : y - H - Hkv;
    const int64_t p = pos ? pos[t] : start + t;
    const int64_t dst = (((int64_t)b * Hkv + h) * max_len + p) * D;
    const __half* src = (is_k ? k : v) + ((int64_t)bt * Hkv + h) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        (is_k ? k_cache : v_cache)[dst + i] = is_k ? rope_at(src, cs, sn, i, D) : src[i];
}

__global__ void silu_mul_kernel(const __half2* __restrict__ g, const __half2* __restrict__ u,
                                __half2* __restrict__ out, int64_t n2) {
    grid_dependents_launch();
    grid_dependency_wait();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2; i += (int64_t)gridDim.x * blockDim.x) {
        const __half2 gi = g[i], ui = u[i];
        out[i] = __halves2half2(silu_mul_h(__low2half(gi), __low2half(ui)), silu_mul_h(__high2half(gi), __high2half(ui)));
    }
}

// Attention of one new token per sequence (batch-1 decode) over the KV cache, split over the
// sequence (flash-decoding). Grid (B * H / GB, S), clusters of S blocks along y: a block serves GB
// query heads that share one kv head (GQA: their keys and values are read once) and the s-th
// of S slices of the n = pos[0] + 1 stored keys; the slices follow n, so a short sequence is not
// left to one block. Inside a block, LPK lanes read one key row (16 bytes each, coalesced), the
// warp's 32 / LPK lane groups take different keys, and every lane group keeps its own running
// (max, sum, weighted values) for its 8 dims: no barrier in the key loop. The groups, warps and
// then the S blocks (through distributed shared memory) are merged at the end in a fixed order.
// SDPA with a mask was one block per head over the whole buffer (8 us per layer on 7B shapes at
// 272 cached positions, 20 us at 2048). q [B, H, D] (roped), caches [B, Hkv, L, D], out [B, H, D].
constexpr int ATT_WARPS = 4;
constexpr int ATT_UNROLL = 4;  // keys per lane group in flight

// (m, l, acc) of another part merged into this one (m = -inf: the part saw no key).
__device__ __forceinline__ void att_merge(float& m, float& l, float (&acc)[8], float m2, float l2, const float (&acc2)[8]) {
    const float M = fmaxf(m, m2);
    const float a = M == -INFINITY ? 0.0f : exp2f(m - M), b = M == -INFINITY ? 0.0f : exp2f(m2 - M);
    l = l * a + l2 * b;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = acc[e] * a + acc2[e] * b;
    m = M;
}

// The new token's inputs when the kernel also does rope_cache's work (ROPE): q and k unroped, their
// cos / sin rows, and the caches to store RoPE(k) and v into at position pos[0]. The stores go
// through these pointers; the keys are read through the kernel's const ones, never at pos[0].
struct AttNew {
    const __half* k;  // [B, Hkv * D]
    const __half* v;
    const __half* cos;  // [D]
    const __half* sin;
    __half* k_cache;
    __half* v_cache;
};

template <int LPK, int GB, bool ROPE>
__global__ void __launch_bounds__(ATT_WARPS * 32) decode_attention_kernel(
    const __half* __restrict__ q, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int64_t* __restrict__ pos, __half* __restrict__ out, int H, int Hkv, int D, int64_t L, float qscale,
    const AttNew nw) {
    constexpr int KPW = 32 / LPK, NG = ATT_WARPS * KPW;  // lane groups per warp and per block
    // Shared: per warp and head (m, l, acc[D]); then the block's merged part, read by the cluster.
    extern __shared__ __align__(16) float att_smem[];
    float* wpart = att_smem;                           // [ATT_WARPS][GB][2 + D]
    float* part = wpart + ATT_WARPS * GB * (2 + D);    // [GB][2 + D]
    grid_dependents_launch();
    grid_dependency_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane % LPK, grp = lane / LPK;
    const int h0 = blockIdx.x * GB, b = h0 / H, kvh = (h0 % H) / (H / Hkv);
    const int s = blockIdx.y, S = gridDim.y;
    const bool dims = 8 * c < D;  // this lane's dims 8c .. 8c + 7
    const int64_t kv = (int64_t)b * Hkv + kvh;  // the kv head's row in the caches and in nw.k, nw.v
    const __half* kh = k_cache + kv * L * D + 8 * c;
    const __half* vh = v_cache + kv * L * D + 8 * c;

    // ROPE: a lane's dims 8c .. 8c + 7 rotate with dims 8c +- D/2 (D % 16 == 0, checked by the caller).
    const int cp = 8 * c < D / 2 ? 8 * c + D / 2 : 8 * c - D / 2;
    float qf[GB][8];  // q * scale * log2(e): the scores come out in base 2
#pragma unroll
    for (int g = 0; g < GB; ++g) {
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        const __half* qg = q + (int64_t)(h0 + g) * D;
        if (dims) w = ROPE ? rope8(qg + 8 * c, qg + cp, nw.cos + 8 * c, nw.sin + 8 * c)
                           : *reinterpret_cast<const uint4*>(qg + 8 * c);
        const __half2* hw = reinterpret_cast<const __half2*>(&w);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(hw[e]);
            qf[g][2 * e] = f.x * qscale;
            qf[g][2 * e + 1] = f.y * qscale;
        }
    }
    const int64_t p = pos[0], n = p + 1, chunk = (n + S - 1) / S;
    const int64_t k0 = s * chunk, k1 = k0 + chunk < n ? k0 + chunk : n;
    // ROPE: the new key and value (position p) come from registers, and the first block of each kv
    // head stores them into the caches, which no block of this launch reads at p.
    uint4 k_new = make_uint4(0u, 0u, 0u, 0u), v_new = make_uint4(0u, 0u, 0u, 0u);
    if (ROPE && dims) {
        const __half* kn = nw.k + kv * D;
        k_new = rope8(kn + 8 * c, kn + cp, nw.cos + 8 * c, nw.sin + 8 * c);
        v_new = *reinterpret_cast<const uint4*>(nw.v + kv * D + 8 * c);
        if (s == 0 && (h0 % H) % (H / Hkv) == 0 && warp == 0 && grp == 0) {
            const int64_t at = (kv * L + p) * D + 8 * c;
            *reinterpret_cast<uint4*>(nw.k_cache + at) = k_new;
            *reinterpret_cast<uint4*>(nw.v_cache + at) = v_new;
        }
    }

    float m[GB], l[GB], acc[GB][8];
#pragma unroll
    for (int g = 0; g < GB; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
    }
    // The trip count is the warp's (not the lane group's): the shuffles below need every lane.
    for (int64_t wbase = k0 + warp * KPW; wbase < k1; wbase += (int64_t)NG * ATT_UNROLL) {
        const int64_t base = wbase + grp;
        uint4 kr[ATT_UNROLL], vr[ATT_UNROLL];
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; ++u) {
            const int64_t j = base + (int64_t)u * NG;
            const bool ok = dims && j < k1 && !(ROPE && j == p);
            kr[u] = ok ? *reinterpret_cast<const uint4*>(kh + j * D) : make_uint4(0u, 0u, 0u, 0u);
            vr[u] = ok ? *reinterpret_cast<const uint4*>(vh + j * D) : make_uint4(0u, 0u, 0u, 0u);
            if (ROPE && j == p) {
                kr[u] = k_new;
                vr[u] = v_new;
            }
        }
        float sc[GB][ATT_UNROLL];
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; ++u) {
            const __half2* hk = reinterpret_cast<const __half2*>(&kr[u]);
#pragma unroll
            for (int g = 0; g < GB; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(hk[e]);
                    d = fmaf(f.x, qf[g][2 * e], fmaf(f.y, qf[g][2 * e + 1], d));
                }
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                sc[g][u] = base + (int64_t)u * NG < k1 ? d : -INFINITY;
            }
        }
#pragma unroll
        for (int g = 0; g < GB; ++g) {
            float mn = m[g];
#pragma unroll
            for (int u = 0; u < ATT_UNROLL; ++u) mn = fmaxf(mn, sc[g][u]);
            if (mn == -INFINITY) continue;  // no valid key in this batch for this lane group
            const float corr = exp2f(m[g] - mn);
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
#pragma unroll
            for (int u = 0; u < ATT_UNROLL; ++u) {
                const float p = exp2f(sc[g][u] - mn);
                l[g] += p;
                const __half2* hv = reinterpret_cast<const __half2*>(&vr[u]);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(hv[e]);
                    acc[g][2 * e] = fmaf(p, f.x, acc[g][2 * e]);
                    acc[g][2 * e + 1] = fmaf(p, f.y, acc[g][2 * e + 1]);
                }
            }
            m[g] = mn;
        }
    }
    // Merge the warp's lane groups (lanes with the same c hold the same dims), then the warps.
#pragma unroll
    for (int g = 0; g < GB; ++g) {
#pragma unroll
        for (int o = LPK; o < 32; o <<= 1) {
            float acc2[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc2[e] = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
            const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o), l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
            att_merge(m[g], l[g], acc[g], m2, l2, acc2);
        }
        float* wp = wpart + (warp * GB + g) * (2 + D);
        if (lane == 0) {
            wp[0] = m[g];
            wp[1] = l[g];
        }
        if (grp == 0 && dims)
#pragma unroll
            for (int e = 0; e < 8; ++e) wp[2 + 8 * c + e] = acc[g][e];
    }
    __syncthreads();
    // The block's part: (M, L) per head and acc rescaled to M, over the GB * D outputs.
    for (int i = threadIdx.x; i < GB * D; i += ATT_WARPS * 32) {
        const int g = i / D, d = i % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, wpart[(w * GB + g) * (2 + D)]);
        float Ls = 0.0f, a = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) {
            const float* wp = wpart + (w * GB + g) * (2 + D);
            const float f = wp[0] == -INFINITY ? 0.0f : exp2f(wp[0] - M);
            Ls += wp[1] * f;
            a += wp[2 + d] * f;
        }
        if (S == 1) {
            out[(int64_t)(h0 + g) * D + d] = __float2half_rn(a / Ls);
        } else {
            if (d == 0) {
                part[g * (2 + D)] = M;
                part[g * (2 + D) + 1] = Ls;
            }
            part[g * (2 + D) + 2 + d] = a;
        }
    }
    if (S == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    // Block s finishes outputs s, s + S, ...: all S parts merged in rank order.
    for (int i = s + S * (int)threadIdx.x; i < GB * D; i += S * ATT_WARPS * 32) {
        const int g = i / D, d = i % D;
        float M = -INFINITY;
        for (int r = 0; r < S; ++r) M = fmaxf(M, cl.map_shared_rank(part, r)[g * (2 + D)]);
        float Ls = 0.0f, a = 0.0f;
        for (int r = 0; r < S; ++r) {
            const float* pr = cl.map_shared_rank(part, r) + g * (2 + D);
            const float f = pr[0] == -INFINITY ? 0.0f : exp2f(pr[0] - M);
            Ls += pr[1] * f;
            a += pr[2 + d] * f;
        }
        out[(int64_t)(h0 + g) * D + d] = __float2half_rn(a / Ls);
    }
    cl.sync();  // keep this block's shared memory alive until every block has read it
#endif
}

template <int LPK, int GB, bool ROPE>
void launch_decode_attention(const __half* q, const __half* kc, const __half* vc, const int64_t* pos, __half* out,
                             int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int S, const AttNew& nw,
                             cudaStream_t st) {
    auto kern = decode_attention_kernel<LPK, GB, ROPE>;
    const size_t smem = (size_t)(ATT_WARPS + 1) * GB * (2 + D) * sizeof(float);
    if (S > 8)
        check(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1), "decode_attention");
    launch_k_split(kern, dim3((unsigned)(B * H / GB), (unsigned)S, 1), ATT_WARPS * 32, smem, st, S,
                   "decode_attention", pdl_enabled(), q, kc, vc, pos, out, (int)H, (int)Hkv, (int)D, L,
                   (float)(1.4426950408889634 / std::sqrt((double)D)), nw);
}

template <int LPK, bool ROPE>
void decode_attention_lpk(const __half* q, const __half* kc, const __half* vc, const int64_t* pos, __half* out,
                          int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int GB, int S, const AttNew& nw,
                          cudaStream_t st) {
    if (GB == 4)
        launch_decode_attention<LPK, 4, ROPE>(q, kc, vc, pos, out, B, H, Hkv, D, L, S, nw, st);
    else if (GB == 2)
        launch_decode_attention<LPK, 2, ROPE>(q, kc, vc, pos, out, B, H, Hkv, D, L, S, nw, st);
    else
        launch_decode_attention<LPK, 1, ROPE>(q, kc, vc, pos, out, B, H, Hkv, D, L, S, nw, st);
}

}  // namespace

void rms_norm(const void* x, const void* residual, const float* w, void* out, void* h_out, int64_t rows,
              int64_t dim, float eps, uintptr_t stream) {
    if (rows <= 0) return;
    const __half* xh = static_cast<const __half*>(x);
    const __half* rh = static_cast<const __half*>(residual);
    __half* oh = static_cast<__half*>(out);
    __half* hh = static_cast<__half*>(h_out);
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool vec = dim % 8 == 0 && aligned(x) && aligned(out) && aligned(w) && (!residual || (aligned(residual) && aligned(h_out)));
    const int per = (int)cdiv(dim / 8, NORM_THREADS);  // chunks of 8 per thread
    const cudaStream_t st = as_stream(stream);
    const unsigned g = (unsigned)rows;
    auto kern = !vec     ? rms_norm_kernel
                : per <= 1 ? rms_norm_vec_kernel<1>
                : per <= 2 ? rms_norm_vec_kernel<2>
                : per <= 4 ? rms_norm_vec_kernel<4>
                : per <= 8 ? rms_norm_vec_kernel<8>
                           : rms_norm_kernel;
    launch_early(kern, dim3(g), NORM_THREADS, 0, st, "rms_norm", xh, rh, w, oh, hh, (int)dim, eps);
}

void rope_cache(void* q, const void* k, const void* v, const void* cos_t, const void* sin_t, void* k_cache,
                void* v_cache, const int64_t* pos, int64_t start, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                int64_t D, int64_t max_len, uintptr_t stream) {
    if (B * T <= 0) return;
    const int threads = (int)std::min<int64_t>(128, cdiv(D, 32) * 32);  // D <= 4 * threads (checked by the caller)
    launch_early(rope_cache_kernel, dim3((unsigned)(B * T), (unsigned)(H + 2 * Hkv)), threads, 0, as_stream(stream),
                 "rope_cache", static_cast<__half*>(q), static_cast<const __half*>(k), static_cast<const __half*>(v),
                 static_cast<const __half*>(cos_t), static_cast<const __half*>(sin_t), static_cast<__half*>(k_cache),
                 static_cast<__half*>(v_cache), pos, start, (int)T, (int)H, (int)Hkv, (int)D, max_len);
}

void decode_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* pos, void* out,
                      int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int sms, uintptr_t stream,
                      const void* k_new, const void* v_new, const void* cos_t, const void* sin_t) {
    if (B * H <= 0) return;
    // Query heads per block: the most of 4, 2, 1 that divides the heads sharing a kv head.
    const int64_t G = H / Hkv;
    const int GB = G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1;
    // Slices: about 4 blocks per SM over the blocks of all heads, a power of two up to 16 (the
    // cluster; 1 before sm_90), and no more than leave each slice 64 keys of a full cache. S follows
    // the allocated length L (one captured graph serves every position); a speed run's short cache
    // (prompt + new tokens) split 16 ways gave each block a few keys for a 16-block cluster's barrier.
    int S = 1;
    if (device_cc_major() >= 9) {
        S = (int)std::min<int64_t>({16, std::max<int64_t>(1, cdiv(4LL * sms, B * H / GB)), std::max<int64_t>(1, L / 64)});
        while (S & (S - 1)) S &= S - 1;
    }
    const auto* qh = static_cast<const __half*>(q);
    const auto* kc = static_cast<const __half*>(k_cache);
    const auto* vc = static_cast<const __half*>(v_cache);
    auto* oh = static_cast<__half*>(out);
    const cudaStream_t st = as_stream(stream);
    const AttNew nw{static_cast<const __half*>(k_new), static_cast<const __half*>(v_new),
                    static_cast<const __half*>(cos_t), static_cast<const __half*>(sin_t),
                    static_cast<__half*>(const_cast<void*>(k_cache)), static_cast<__half*>(const_cast<void*>(v_cache))};
    auto launch = [&](auto rope) {  // rope: std::bool_constant, whether the launch does rope_cache's work
        constexpr bool R = decltype(rope)::value;
        if (D <= 64)  // 8 lanes per key row (head_dim <= 64), else 16 (<= 128; checked by the caller)
            decode_attention_lpk<8, R>(qh, kc, vc, pos, oh, B, H, Hkv, D, L, GB, S, nw, st);
        else
            decode_attention_lpk<16, R>(qh, kc, vc, pos, oh, B, H, Hkv, D, L, GB, S, nw, st);
    };
    if (k_new)
        launch(std::true_type{});
    else
        launch(std::false_type{});
}

void silu_mul(const void* g, const void* u, void* out, int64_t n, uintptr_t stream) {
    if (n <= 0) return;
    const int64_t n2 = n / 2;  // n even (checked by the caller)
    launch_early(silu_mul_kernel, dim3(grid_for(n2, 256, 4096)), 256, 0, as_stream(stream), "silu_mul",
                 static_cast<const __half2*>(g), static_cast<const __half2*>(u), static_cast<__half2*>(out), n2);
}

}  // namespace exl2cuda
