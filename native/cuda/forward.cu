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
//  * silu_mul: f16(f16(silu(g)) * u), as torch's silu then mul.
// Each lets the next kernel start at once (programmatic dependent launch): the matmul that follows
// prefetches its weights while this one runs and waits for it before reading its output.
// The norm's f32 sum runs in a different order than torch's, so its outputs may differ from
// torch's in the last bit; rope_cache and silu_mul match torch bit for bit.

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "kernels_cuda.cuh"

namespace exl2cuda {

namespace {

constexpr int NORM_THREADS = 256;

// One block per row. The row is read twice (sum of squares, then scaling); the second read hits
// L1/L2 (a row is at most a few tens of KB).
__global__ void __launch_bounds__(NORM_THREADS) rms_norm_kernel(const __half* __restrict__ x,
                                                                const __half* __restrict__ r,
                                                                const float* __restrict__ w,
                                                                __half* __restrict__ out, __half* h_out, int dim,
                                                                float eps) {
    grid_dependents_launch();  // a following matmul may start prefetching its weights now
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
    __shared__ float part[NORM_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float tot = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) tot += part[i];
    const float inv = rsqrtf(tot / (float)dim + eps);
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
    __shared__ float part[NORM_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float tot = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) tot += part[i];
    const float inv = rsqrtf(tot / (float)dim + eps);
#pragma unroll
    for (int c = 0; c < V; ++c) {
        const int i = threadIdx.x + c * NORM_THREADS;
        if (i >= chunks) break;
        const float4 w0 = reinterpret_cast<const float4*>(w)[2 * i], w1 = reinterpret_cast<const float4*>(w)[2 * i + 1];
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

// rotate-half RoPE of element i of a head: f16(f16(x[i] * cos[i]) + x[(i + D/2) % D] * sin[i]).
__device__ __forceinline__ __half rope_at(const __half* head, const __half* cs, const __half* sn, int i, int D) {
    const int j = i < D / 2 ? i + D / 2 : i - D / 2;
    const float xc = __half2float(__float2half_rn(__half2float(head[i]) * __half2float(cs[i])));
    return __float2half_rn(xc + __half2float(head[j]) * __half2float(sn[i]));
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
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2; i += (int64_t)gridDim.x * blockDim.x) {
        const float2 gf = __half22float2(g[i]), uf = __half22float2(u[i]);
        // torch: silu in f32 rounded to f16, then an f16 multiply (computed in f32, rounded)
        const float s0 = __half2float(__float2half_rn(gf.x / (1.0f + expf(-gf.x))));
        const float s1 = __half2float(__float2half_rn(gf.y / (1.0f + expf(-gf.y))));
        out[i] = __floats2half2_rn(s0 * uf.x, s1 * uf.y);
    }
}

// Attention of one new token per sequence (batch-1 decode) over the KV cache, split over the
// sequence: grid (B * H, S) in clusters of S blocks along y. Block s scores keys
// [s * chunk, (s + 1) * chunk) of the n = pos[0] + 1 valid ones, one key per thread in batches of
// ATT_THREADS, with an online softmax across batches; the S partial (max, sum, weighted values)
// are combined through distributed shared memory, each block finishing D / S of the dims. A head
// was one block of SDPA's kernel (8 us per layer on a 7B-shaped model); S blocks read its keys
// in parallel. q [B, H, D] (roped), caches [B, Hkv, L, D], out [B, H, D]; scale = 1 / sqrt(D).
constexpr int ATT_THREADS = 128;

__global__ void __launch_bounds__(ATT_THREADS) decode_attention_kernel(
    const __half* __restrict__ q, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int64_t* __restrict__ pos, __half* __restrict__ out, int H, int Hkv, int D, int64_t L, int chunk,
    float scale) {
    extern __shared__ __align__(16) float att_smem[];
    float* qs = att_smem;              // [D] q * scale * log2(e)
    float* p = qs + D;                 // [ATT_THREADS] this batch's exp2(score - m)
    float* red = p + ATT_THREADS;      // [ATT_THREADS / 32] reduction scratch
    float* part = red + ATT_THREADS / 32 + 2;  // [2 + D]: m, l, acc (read by the cluster)
    grid_dependents_launch();
    const int bh = blockIdx.x, b = bh / H, h = bh % H, s = blockIdx.y, S = gridDim.y;
    const int kvh = h / (H / Hkv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const __half* kh = k_cache + ((int64_t)b * Hkv + kvh) * L * D;
    const __half* vh = v_cache + ((int64_t)b * Hkv + kvh) * L * D;
    for (int d = tid; d < D; d += ATT_THREADS)
        qs[d] = __half2float(q[(int64_t)bh * D + d]) * scale * 1.4426950408889634f;
    const int64_t n = pos[0] + 1;
    const int64_t k0 = (int64_t)s * chunk, k1 = k0 + chunk < n ? k0 + chunk : n;
    __syncthreads();

    auto block_reduce = [&](float v, bool is_max) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float w = __shfl_xor_sync(0xffffffffu, v, o);
            v = is_max ? fmaxf(v, w) : v + w;
        }
        if (lane == 0) red[warp] = v;
        __syncthreads();
        float r = red[0];
#pragma unroll
        for (int i = 1; i < ATT_THREADS / 32; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
        __syncthreads();
        return r;
    };

    float m = -INFINITY, l = 0.0f, acc = 0.0f;  // acc: dim tid (tid < D; D <= ATT_THREADS)
    for (int64_t base = k0; base < k1; base += ATT_THREADS) {
        const int64_t j = base + tid;
        float sc = -INFINITY;
        if (j < k1) {
            const uint4* kr = reinterpret_cast<const uint4*>(kh + j * D);
            float dot = 0.0f;
            for (int c = 0; c < D / 8; ++c) {
                const uint4 w = kr[c];
                const __half2* hw = reinterpret_cast<const __half2*>(&w);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(hw[e]);
                    dot = fmaf(f.x, qs[8 * c + 2 * e], dot);
                    dot = fmaf(f.y, qs[8 * c + 2 * e + 1], dot);
                }
            }
            sc = dot;
        }
        const float mb = block_reduce(sc, true);
        const float m_new = fmaxf(m, mb);
        const float pj = j < k1 ? exp2f(sc - m_new) : 0.0f;
        p[tid] = pj;
        const float corr = exp2f(m - m_new);  // 0 on the first batch (m = -inf)
        l = l * corr + block_reduce(pj, false);  // the reduction's barrier also publishes p
        m = m_new;
        if (tid < D) {
            acc *= corr;
            const int cnt = (int)(k1 - base < ATT_THREADS ? k1 - base : ATT_THREADS);
            const __half* vr = vh + base * D + tid;
#pragma unroll 8
            for (int i = 0; i < cnt; ++i) acc = fmaf(p[i], __half2float(vr[(int64_t)i * D]), acc);
        }
        __syncthreads();  // p is rewritten by the next batch
    }
    __half* o = out + (int64_t)bh * D;
    if (S == 1) {
        if (tid < D) o[tid] = __float2half_rn(acc / l);
        return;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    if (tid == 0) {
        part[0] = m;
        part[1] = l;
    }
    if (tid < D) part[2 + tid] = acc;
    cl.sync();
    float M = -INFINITY;
    for (int r = 0; r < S; ++r) M = fmaxf(M, cl.map_shared_rank(part, r)[0]);
    float Lsum = 0.0f;
    for (int r = 0; r < S; ++r) {
        const float* pr = cl.map_shared_rank(part, r);
        Lsum += pr[1] * exp2f(pr[0] - M);  // a block without valid keys: l = 0
    }
    for (int d = tid; d < D; d += ATT_THREADS) {
        if (d % S != s) continue;
        float v = 0.0f;
        for (int r = 0; r < S; ++r) {
            const float* pr = cl.map_shared_rank(part, r);
            if (pr[1] > 0.0f) v += pr[2 + d] * exp2f(pr[0] - M);
        }
        o[d] = __float2half_rn(v / Lsum);
    }
    cl.sync();  // keep this block's shared memory alive until every block has read it
#endif
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
    if (vec && per <= 1)
        rms_norm_vec_kernel<1><<<g, NORM_THREADS, 0, st>>>(xh, rh, w, oh, hh, (int)dim, eps);
    else if (vec && per <= 2)
        rms_norm_vec_kernel<2><<<g, NORM_THREADS, 0, st>>>(xh, rh, w, oh, hh, (int)dim, eps);
    else if (vec && per <= 4)
        rms_norm_vec_kernel<4><<<g, NORM_THREADS, 0, st>>>(xh, rh, w, oh, hh, (int)dim, eps);
    else if (vec && per <= 8)
        rms_norm_vec_kernel<8><<<g, NORM_THREADS, 0, st>>>(xh, rh, w, oh, hh, (int)dim, eps);
    else
        rms_norm_kernel<<<g, NORM_THREADS, 0, st>>>(xh, rh, w, oh, hh, (int)dim, eps);
    check_launch("rms_norm");
}

void rope_cache(void* q, const void* k, const void* v, const void* cos_t, const void* sin_t, void* k_cache,
                void* v_cache, const int64_t* pos, int64_t start, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                int64_t D, int64_t max_len, uintptr_t stream) {
    if (B * T <= 0) return;
    const int threads = (int)std::min<int64_t>(128, cdiv(D, 32) * 32);  // D <= 4 * threads (checked by the caller)
    rope_cache_kernel<<<dim3((unsigned)(B * T), (unsigned)(H + 2 * Hkv)), threads, 0, as_stream(stream)>>>(
        static_cast<__half*>(q), static_cast<const __half*>(k), static_cast<const __half*>(v),
        static_cast<const __half*>(cos_t), static_cast<const __half*>(sin_t), static_cast<__half*>(k_cache),
        static_cast<__half*>(v_cache), pos, start, (int)T, (int)H, (int)Hkv, (int)D, max_len);
    check_launch("rope_cache");
}

void decode_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* pos, void* out,
                      int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int sms, uintptr_t stream) {
    if (B * H <= 0) return;
    // Enough blocks for ~2 per SM, at least 16 keys each; a power of two up to 16 (the cluster).
    int S = (int)std::min<int64_t>(16, std::max<int64_t>(1, cdiv(2LL * sms, B * H)));
    S = (int)std::min<int64_t>(S, std::max<int64_t>(1, L / 16));
    while (S & (S - 1)) S &= S - 1;
    const int chunk = (int)cdiv(L, S);
    const size_t smem = (size_t)(D + ATT_THREADS + ATT_THREADS / 32 + 2 + 2 + D) * sizeof(float);
    auto kern = decode_attention_kernel;
    if (S > 8)
        check(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1), "decode_attention");
    launch_k_split(kern, dim3((unsigned)(B * H), (unsigned)S, 1), ATT_THREADS, smem, as_stream(stream), S,
                   "decode_attention", false, static_cast<const __half*>(q), static_cast<const __half*>(k_cache),
                   static_cast<const __half*>(v_cache), pos, static_cast<__half*>(out), (int)H, (int)Hkv, (int)D, L,
                   chunk, (float)(1.0 / std::sqrt((double)D)));
}

void silu_mul(const void* g, const void* u, void* out, int64_t n, uintptr_t stream) {
    if (n <= 0) return;
    const int64_t n2 = n / 2;  // n even (checked by the caller)
    silu_mul_kernel<<<grid_for(n2, 256, 4096), 256, 0, as_stream(stream)>>>(
        static_cast<const __half2*>(g), static_cast<const __half2*>(u), static_cast<__half2*>(out), n2);
    check_launch("silu_mul");
}

}  // namespace exl2cuda
