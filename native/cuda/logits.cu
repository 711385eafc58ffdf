// logit_stats: one block per row, one pass over V with an online log-sum-exp (f32), the
// first argmax, -log p(target), and the top-k + tail KLD(ref || q) in float64.
#include <cfloat>

#include "common.cuh"
#include "kernels_cuda.cuh"

namespace exl2cuda {

namespace {

struct Lse {
    float m;   // running max
    float s;   // sum of exp(x - m)
    int64_t i; // first index of the max
};

__device__ __forceinline__ void lse_add(Lse& a, float x, int64_t idx) {
    if (!(x > -INFINITY)) return;  // -inf (masked) and NaN contribute nothing
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
        a.i = idx;
    } else {
        a.s += expf(x - a.m);
    }
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
    if (b.m > a.m || (b.m == a.m && b.i < a.i)) {
        Lse t = a;
        a = b;
        b = t;
    }
    // a has the larger max (or equal max and the smaller index)
    if (b.m > -INFINITY) a.s += b.s * expf(b.m - a.m);
    return a;
}

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T>
__global__ void __launch_bounds__(512) logit_stats_kernel(const T* __restrict__ logits, int64_t V,
                                                          const int64_t* __restrict__ targets,
                                                          const int32_t* __restrict__ ref_idx,
                                                          const float* __restrict__ ref_logp, int64_t k,
                                                          float* __restrict__ nll_out, int64_t* __restrict__ argmax_out,
                                                          float* __restrict__ kld_out) {
    __shared__ float sm_m[32], sm_s[32];
    __shared__ long long sm_i[32];
    __shared__ float sh_lse;
    __shared__ double sh_red[3][32];
    const int64_t t = blockIdx.x;
    const T* row = logits + t * V;
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    Lse a{-INFINITY, 0.0f, (int64_t)V};

    // 16-byte vector body between a scalar head and tail.
    constexpr int VEC = 16 / sizeof(T);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
    int64_t head = (int64_t)(((16 - (addr & 15)) & 15) / sizeof(T));
    if ((addr % sizeof(T)) != 0 || head > V) head = V;
    const int64_t nvec = (V - head) / VEC;
    for (int64_t i = tid; i < head; i += nt) lse_add(a, to_f(row[i]), i);
    const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
    for (int64_t v = tid; v < nvec; v += nt) {
        const uint4 raw = __ldcs(vrow + v);
        const T* e = reinterpret_cast<const T*>(&raw);
        float f[VEC];
        float bm = -INFINITY;
        int bj = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            f[j] = to_f(e[j]);
            if (f[j] > bm) { bm = f[j]; bj = j; }
        }
        if (!(bm > -INFINITY)) continue;
        const int64_t base = head + v * VEC;
        if (bm > a.m) {
            a.s *= expf(a.m - bm);
            a.m = bm;
            a.i = base + bj;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            if (f[j] > -INFINITY) a.s += expf(f[j] - a.m);
    }
    for (int64_t i = head + nvec * VEC + tid; i < V; i += nt) lse_add(a, to_f(row[i]), i);

    // block reduction
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Lse b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o),
              (int64_t)__shfl_xor_sync(0xffffffffu, (long long)a.i, o)};
        a = lse_merge(a, b);
    }
    if (lane == 0) { sm_m[warp] = a.m; sm_s[warp] = a.s; sm_i[warp] = a.i; }
    __syncthreads();
    if (warp == 0) {
        const int nw = nt >> 5;
        Lse b = lane < nw ? Lse{sm_m[lane], sm_s[lane], (int64_t)sm_i[lane]} : Lse{-INFINITY, 0.0f, (int64_t)V};
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            Lse c{__shfl_xor_sync(0xffffffffu, b.m, o), __shfl_xor_sync(0xffffffffu, b.s, o),
                  (int64_t)__shfl_xor_sync(0xffffffffu, (long long)b.i, o)};
            b = lse_merge(b, c);
        }
        if (lane == 0) {
            const float lse = b.m + logf(b.s);
            sh_lse = lse;
            nll_out[t] = lse - to_f(row[targets[t]]);
            argmax_out[t] = b.i < V ? b.i : 0;
        }
    }
    if (kld_out == nullptr) return;
    __syncthreads();
    const double lse = (double)sh_lse;
    double sp = 0.0, sq = 0.0, kl = 0.0;
    for (int64_t j = tid; j < k; j += nt) {
        const double logq = (double)to_f(row[ref_idx[t * k + j]]) - lse;
        const double logp = (double)ref_logp[t * k + j];
        const double p = exp(logp), q = exp(logq);
        sp += p;
        sq += q;
        kl += p * (logp - logq);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        sp += __shfl_xor_sync(0xffffffffu, sp, o);
        sq += __shfl_xor_sync(0xffffffffu, sq, o);
        kl += __shfl_xor_sync(0xffffffffu, kl, o);
    }
    if (lane == 0) { sh_red[0][warp] = sp; sh_red[1][warp] = sq; sh_red[2][warp] = kl; }
    __syncthreads();
    if (tid == 0) {
        sp = sq = kl = 0.0;
        for (int w = 0; w < (nt >> 5); ++w) { sp += sh_red[0][w]; sq += sh_red[1][w]; kl += sh_red[2][w]; }
        const double p_tail = fmax(1.0 - sp, 0.0);
        const double q_tail = fmax(1.0 - sq, 1e-10);
        if (p_tail > 0.0) kl += p_tail * (log(p_tail) - log(q_tail));
        kld_out[t] = (float)kl;
    }
}

}  // namespace

void logit_stats(const void* logits, bool logits_is_f16, int64_t T, int64_t V, const int64_t* targets,
                 const int32_t* ref_idx, const float* ref_logp, int64_t k, float* nll_out, int64_t* argmax_out,
                 float* kld_out, uintptr_t stream) {
    if (T <= 0 || V <= 0) return;
    if (T > 0x7fffffffLL) throw std::runtime_error("logit_stats: too many rows");
    const bool with_ref = ref_idx != nullptr && ref_logp != nullptr && kld_out != nullptr;
    const int threads = V >= 16384 ? 512 : 256;
    cudaStream_t st = as_stream(stream);
    if (logits_is_f16)
        logit_stats_kernel<__half><<<(unsigned)T, threads, 0, st>>>(
            static_cast<const __half*>(logits), V, targets, ref_idx, ref_logp, with_ref ? k : 0, nll_out, argmax_out,
            with_ref ? kld_out : nullptr);
    else
        logit_stats_kernel<float><<<(unsigned)T, threads, 0, st>>>(static_cast<const float*>(logits), V, targets,
                                                                   ref_idx, ref_logp, with_ref ? k : 0, nll_out,
                                                                   argmax_out, with_ref ? kld_out : nullptr);
    check_launch("logit_stats");
}

}  // namespace exl2cuda
