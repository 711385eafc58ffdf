// Quantization kernels: round-to-nearest rows, the per-group scale search and GPTQ inside
// one group. Arithmetic follows exl2build/kernels_ref.py operation by operation (no FMA
// contraction where the reference rounds twice), so codes agree bit for bit.
#include <cfloat>

#include "common.cuh"
#include "kernels_cuda.cuh"

namespace exl2cuda {

// q = clamp(round(w/scale) + 2^(b-1), 0, 2^b-1) (zero scale -> zero code); returns deq.
__device__ __forceinline__ float quant_one(float w, float sc, float zero, float maxq, uint8_t& code) {
    const float ratio = sc > 0.0f ? __fdiv_rn(w, sc) : 0.0f;
    const float q = fminf(fmaxf(__fadd_rn(rintf(ratio), zero), 0.0f), maxq);
    code = (uint8_t)q;
    return __fmul_rn(__fsub_rn(q, zero), sc);
}

__global__ void quantize_rows_kernel(const float* __restrict__ w, const float* __restrict__ scale,
                                     uint8_t* __restrict__ codes, float* __restrict__ deq, int64_t R, int64_t N,
                                     int bits) {
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
    const int64_t total = R * N;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = idx % N;
        uint8_t c;
        deq[idx] = quant_one(w[idx], scale[n], zero, maxq, c);
        codes[idx] = c;
    }
}

void quantize_rows(const float* w, const float* scale, uint8_t* codes, float* deq, int64_t R, int64_t N, int bits,
                   uintptr_t stream) {
    if (R * N == 0) return;
    quantize_rows_kernel<<<grid_for(R * N, 256), 256, 0, as_stream(stream)>>>(w, scale, codes, deq, R, N, bits);
    check_launch("quantize_rows");
}

// ---------------------------------------------------------------------------------------
// group_scale_search: three launches on the stream.
//   1. colstats: base[n] = absmax_r |w| / 2^(b-1); per-block maxima.
//   2. score:    every block takes 32 columns (w tile in shared memory) and all factors p;
//                per (block, p) the sum of |w - deq|^norm in float64, written in a fixed
//                order (deterministic).
//   3. finish:   one block sums the partials per p in block order, picks the first
//                minimum and writes qscale, scale and scale_max.

__device__ __forceinline__ float p_value(int i, float lo, float hi, int steps) {
    if (steps == 1) return lo;
    const float t = __fdiv_rn((float)i, (float)(steps - 1));
    return __fadd_rn(lo, __fmul_rn(__fsub_rn(hi, lo), t));
}

__device__ __forceinline__ int base_code(float base, float smax0) {
    const float ratio = smax0 > 0.0f ? __fdiv_rn(base, smax0) : 0.0f;
    const float s = fminf(fmaxf(rintf(__fmul_rn(__fsqrt_rn(ratio), 16.0f)), 1.0f), 16.0f);
    return (int)s;
}

__device__ __forceinline__ float block_max_of(const float* __restrict__ v, int n, float* red) {
    // All threads call; returns the max of v[0..n) to every thread.
    float m = 0.0f;
    const int nt = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int i = tid; i < n; i += nt) m = fmaxf(m, v[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((tid & 31) == 0) red[tid >> 5] = m;
    __syncthreads();
    m = 0.0f;
    for (int i = 0; i < nt / 32; ++i) m = fmaxf(m, red[i]);
    __syncthreads();
    return m;
}

__global__ void gss_colstats_kernel(const float* __restrict__ w, int64_t R, int64_t N, int bits,
                                    float* __restrict__ base, float* __restrict__ blockmax) {
    __shared__ float red[32];
    const int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    float b = 0.0f;
    if (n < N) {
        float a = 0.0f;
        for (int64_t r = 0; r < R; ++r) a = fmaxf(a, fabsf(w[r * N + n]));
        b = __fdiv_rn(a, (float)(1 << (bits - 1)));
        base[n] = b;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = b;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = 0.0f;
        for (int i = 0; i < (int)(blockDim.x / 32); ++i) m = fmaxf(m, red[i]);
        blockmax[blockIdx.x] = m;
    }
}

__device__ __forceinline__ double err_pow(double e, double norm, int mode) {
    if (mode == 1) return e * e * e * sqrt(e);  // norm 3.5
    if (mode == 2) return e * e;
    return pow(e, norm);
}

constexpr int GSS_TW = 32;  // columns per block
constexpr int GSS_PL = 8;   // factors in parallel per column

__global__ void __launch_bounds__(GSS_TW* GSS_PL) gss_score_kernel(
    const float* __restrict__ w, int64_t R, int64_t N, int bits, float lo, float hi, int steps, double norm,
    int mode, const float* __restrict__ base, const float* __restrict__ blockmax, int nb1,
    double* __restrict__ partial) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    double* errs = reinterpret_cast<double*>(smem_raw);               // [steps][TW]
    float* red = reinterpret_cast<float*>(errs + (int64_t)steps * GSS_TW);  // 32
    float* tile = red + 32;                                           // [R][TW]
    const int c = threadIdx.x, pl = threadIdx.y, tid = pl * GSS_TW + c;
    const float smax0 = block_max_of(blockmax, nb1, red);
    const int64_t n0 = (int64_t)blockIdx.x * GSS_TW;
    for (int64_t i = tid; i < R * GSS_TW; i += GSS_TW * GSS_PL) {
        const int64_t r = i / GSS_TW, cc = i % GSS_TW;
        tile[i] = (n0 + cc < N) ? w[r * N + n0 + cc] : 0.0f;
    }
    __syncthreads();
    const bool valid = n0 + c < N;
    const int s = valid ? base_code(base[n0 + c], smax0) : 1;
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
    for (int pi = pl; pi < steps; pi += GSS_PL) {
        double acc = 0.0;
        if (valid) {
            const __half smax = __float2half_rn(__fmul_rn(smax0, p_value(pi, lo, hi, steps)));
            const float sc = exl2_scale(s, smax);
            for (int64_t r = 0; r < R; ++r) {
                const float x = tile[r * GSS_TW + c];
                uint8_t code;
                const float d = quant_one(x, sc, zero, maxq, code);
                acc += err_pow((double)fabsf(__fsub_rn(x, d)), norm, mode);
            }
        }
        errs[pi * GSS_TW + c] = acc;
    }
    __syncthreads();
    for (int pi = tid; pi < steps; pi += GSS_TW * GSS_PL) {
        double t = 0.0;
        for (int cc = 0; cc < GSS_TW; ++cc) t += errs[pi * GSS_TW + cc];
        partial[(int64_t)blockIdx.x * steps + pi] = t;
    }
}

__global__ void gss_finish_kernel(int64_t N, float lo, float hi, int steps, const float* __restrict__ base,
                                  const float* __restrict__ blockmax, int nb1, const double* __restrict__ partial,
                                  int nb2, uint8_t* __restrict__ qscale_out, float* __restrict__ scale_out,
                                  float* __restrict__ scale_max_out) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    double* total = reinterpret_cast<double*>(smem_raw);  // [steps]
    float* red = reinterpret_cast<float*>(total + steps);
    __shared__ int best;
    const float smax0 = block_max_of(blockmax, nb1, red);
    for (int pi = threadIdx.x; pi < steps; pi += blockDim.x) {
        double t = 0.0;
        for (int b = 0; b < nb2; ++b) t += partial[(int64_t)b * steps + pi];
        total[pi] = t;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int bi = 0;
        for (int pi = 1; pi < steps; ++pi)
            if (total[pi] < total[bi]) bi = pi;
        best = bi;
    }
    __syncthreads();
    const __half smax = __float2half_rn(__fmul_rn(smax0, p_value(best, lo, hi, steps)));
    if (threadIdx.x == 0) scale_max_out[0] = __half2float(smax);
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
        const int s = base_code(base[n], smax0);
        qscale_out[n] = (uint8_t)s;
        scale_out[n] = exl2_scale(s, smax);
    }
}

void group_scale_search(const float* w, int64_t R, int64_t N, int bits, double p_min, double p_max, int64_t p_steps,
                        double norm, uint8_t* qscale_out, float* scale_out, float* scale_max_out, uintptr_t stream) {
    cudaStream_t st = as_stream(stream);
    if (R <= 0 || N <= 0 || p_steps <= 0) throw std::runtime_error("group_scale_search: empty input");
    const int nb1 = (int)cdiv(N, 256);
    const int nb2 = (int)cdiv(N, GSS_TW);
    const int steps = (int)p_steps;
    const size_t base_bytes = ((size_t)N * 4 + 255) / 256 * 256;
    const size_t bmax_bytes = ((size_t)nb1 * 4 + 255) / 256 * 256;
    StreamBuffer scratch(base_bytes + bmax_bytes + (size_t)nb2 * steps * 8, st, "group_scale_search");
    float* base = static_cast<float*>(scratch.p);
    float* blockmax = reinterpret_cast<float*>(static_cast<char*>(scratch.p) + base_bytes);
    double* partial = reinterpret_cast<double*>(static_cast<char*>(scratch.p) + base_bytes + bmax_bytes);
    const float lo = (float)p_min, hi = (float)p_max;
    const int mode = norm == 3.5 ? 1 : (norm == 2.0 ? 2 : 0);

    gss_colstats_kernel<<<nb1, 256, 0, st>>>(w, R, N, bits, base, blockmax);
    check_launch("group_scale_search");
    const size_t smem2 = (size_t)steps * GSS_TW * 8 + 32 * 4 + (size_t)R * GSS_TW * 4;
    if (smem2 > 48 * 1024) {
        if (smem2 > 200 * 1024) throw std::runtime_error("group_scale_search: group too large for shared memory");
        check(cudaFuncSetAttribute(gss_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem2),
              "group_scale_search");
    }
    gss_score_kernel<<<nb2, dim3(GSS_TW, GSS_PL), smem2, st>>>(w, R, N, bits, lo, hi, steps, norm, mode, base,
                                                               blockmax, nb1, partial);
    check_launch("group_scale_search");
    const size_t smem3 = (size_t)steps * 8 + 32 * 4;
    if (smem3 > 48 * 1024) {
        if (smem3 > 200 * 1024) throw std::runtime_error("group_scale_search: too many p_steps");
        check(cudaFuncSetAttribute(gss_finish_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem3),
              "group_scale_search");
    }
    gss_finish_kernel<<<1, 1024, smem3, st>>>(N, lo, hi, steps, base, blockmax, nb1, partial, nb2, qscale_out,
                                              scale_out, scale_max_out);
    check_launch("group_scale_search");
}

// ---------------------------------------------------------------------------------------
// gptq_group: one warp per block, one column per thread; the column's g rows live in
// shared memory, rows are processed in order, hinv rows are read as warp-uniform loads.

__global__ void __launch_bounds__(32) gptq_group_kernel(float* __restrict__ w, const float* __restrict__ hinv,
                                                        const float* __restrict__ scale, uint8_t* __restrict__ codes,
                                                        float* __restrict__ err, int g, int64_t N, int bits) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* col = reinterpret_cast<float*>(smem_raw);  // [g][32]
    const int lane = threadIdx.x;
    const int64_t n = (int64_t)blockIdx.x * 32 + lane;
    const bool valid = n < N;
    for (int r = 0; r < g; ++r) col[r * 32 + lane] = valid ? w[(int64_t)r * N + n] : 0.0f;
    const float sc = valid ? scale[n] : 1.0f;
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
    for (int i = 0; i < g; ++i) {
        const float wi = col[i * 32 + lane];
        uint8_t code;
        const float d = quant_one(wi, sc, zero, maxq, code);
        const float e = __fdiv_rn(__fsub_rn(wi, d), __ldg(hinv + (int64_t)i * g + i));
        if (valid) {
            codes[(int64_t)i * N + n] = code;
            err[(int64_t)i * N + n] = e;
        }
        const float* hrow = hinv + (int64_t)i * g;
        int j = i + 1;
        for (; j + 4 <= g; j += 4) {
            const float h0 = __ldg(hrow + j), h1 = __ldg(hrow + j + 1), h2 = __ldg(hrow + j + 2),
                        h3 = __ldg(hrow + j + 3);
            col[j * 32 + lane] = __fsub_rn(col[j * 32 + lane], __fmul_rn(h0, e));
            col[(j + 1) * 32 + lane] = __fsub_rn(col[(j + 1) * 32 + lane], __fmul_rn(h1, e));
            col[(j + 2) * 32 + lane] = __fsub_rn(col[(j + 2) * 32 + lane], __fmul_rn(h2, e));
            col[(j + 3) * 32 + lane] = __fsub_rn(col[(j + 3) * 32 + lane], __fmul_rn(h3, e));
        }
        for (; j < g; ++j) col[j * 32 + lane] = __fsub_rn(col[j * 32 + lane], __fmul_rn(__ldg(hrow + j), e));
        col[i * 32 + lane] = d;
    }
    if (valid)
        for (int r = 0; r < g; ++r) w[(int64_t)r * N + n] = col[r * 32 + lane];
}

void gptq_group(float* w, const float* hinv, const float* scale, uint8_t* codes, float* err, int64_t g, int64_t N,
                int bits, uintptr_t stream) {
    if (g == 0 || N == 0) return;
    const size_t smem = (size_t)g * 32 * 4;
    if (smem > 48 * 1024) {
        if (smem > 200 * 1024) throw std::runtime_error("gptq_group: group of " + std::to_string(g) + " rows too large");
        check(cudaFuncSetAttribute(gptq_group_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
              "gptq_group");
    }
    gptq_group_kernel<<<(unsigned)cdiv(N, 32), 32, smem, as_stream(stream)>>>(w, hinv, scale, codes, err, (int)g, N,
                                                                              bits);
    check_launch("gptq_group");
}

}  // namespace exl2cuda
