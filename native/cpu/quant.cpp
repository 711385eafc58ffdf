// Quantization kernels: round-to-nearest rows, the per-group scale search and GPTQ inside
// one group. Results match exl2build/kernels_ref.py bit for bit: the same f32 operations
// in the same order, and no FMA contraction (the AVX-512 clones could otherwise fuse them).
#pragma GCC optimize("fp-contract=off")
#include <cmath>
#include <omp.h>

#include "common.h"
#include "kernels_cpu.h"

namespace exl2 {

EXL2_MULTIVERSION
void quantize_span(const float* w, const float* scale, uint8_t* codes, float* deq, int64_t n,
                   float zero, float maxq) {
    for (int64_t c = 0; c < n; ++c) {
        const float q = quant_code(w[c], scale[c], zero, maxq);
        codes[c] = (uint8_t)q;
        deq[c] = (q - zero) * scale[c];
    }
}

void quantize_rows(const float* w, const float* scale, uint8_t* codes, float* deq, int64_t R,
                   int64_t N, int bits) {
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
#pragma omp parallel for schedule(static) if (R * N >= kParallelMin)
    for (int64_t r = 0; r < R; ++r)
        quantize_span(w + r * N, scale, codes + r * N, deq + r * N, N, zero, maxq);
}

// |e|^(IPOW + HALF/2) with multiplies and one sqrt: vectorises, unlike pow.
// The builtins, not std::sqrt/std::fabs: under this file's `#pragma GCC optimize` gcc 12
// emits <cmath>'s wrappers out of line and will not inline them into the target_clones
// bodies, which left the scale search scalar with two calls per element (8x slower).
// Both are exact (IEEE sqrt is correctly rounded in every ISA), so results do not change.
template <int IPOW, bool HALF>
static inline float fast_pow(float e) {
    float t = HALF ? __builtin_sqrtf(e) : 1.0f;
    for (int k = 0; k < IPOW; ++k) t *= e;
    return t;
}

// Column sums of |w - deq(w)|^norm in f32 over the group's rows (few: rounding stays far
// below the gaps between factors), then one double total.
template <int IPOW, bool HALF>
__attribute__((always_inline)) static inline double group_error_fixed(
    const float* w, int64_t R, int64_t N, const float* scale, float zero, float maxq, float* acc) {
    for (int64_t c = 0; c < N; ++c) acc[c] = 0.0f;
    for (int64_t r = 0; r < R; ++r) {
        const float* wr = w + r * N;
        for (int64_t c = 0; c < N; ++c) {
            const float q = quant_code(wr[c], scale[c], zero, maxq);
            acc[c] += fast_pow<IPOW, HALF>(__builtin_fabsf(wr[c] - (q - zero) * scale[c]));
        }
    }
    double s = 0.0;
    for (int64_t c = 0; c < N; ++c) s += acc[c];
    return s;
}

static double group_error_pow(const float* w, int64_t R, int64_t N, const float* scale, float zero,
                              float maxq, double norm) {
    double s = 0.0;
    for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < N; ++c) {
            const float q = quant_code(w[r * N + c], scale[c], zero, maxq);
            s += std::pow((double)std::fabs(w[r * N + c] - (q - zero) * scale[c]), norm);
        }
    return s;
}

// Sum over the group of |w - deq(w)|^norm for one set of scales; acc: N floats of scratch.
EXL2_MULTIVERSION
double group_error(const float* w, int64_t R, int64_t N, const float* scale, float zero, float maxq,
                   double norm, float* acc) {
    if (norm == 3.5) return group_error_fixed<3, true>(w, R, N, scale, zero, maxq, acc);
    if (norm == 2.0) return group_error_fixed<2, false>(w, R, N, scale, zero, maxq, acc);
    if (norm == 2.5) return group_error_fixed<2, true>(w, R, N, scale, zero, maxq, acc);
    if (norm == 3.0) return group_error_fixed<3, false>(w, R, N, scale, zero, maxq, acc);
    if (norm == 4.0) return group_error_fixed<4, false>(w, R, N, scale, zero, maxq, acc);
    return group_error_pow(w, R, N, scale, zero, maxq, norm);
}

void group_scale_search(const float* w, int64_t R, int64_t N, int bits, double p_min, double p_max,
                        int64_t p_steps, double norm, uint8_t* qscale_out, float* scale_out,
                        float* scale_max_out) {
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
    // Base scales: column absmax / 2^(b-1); codes are sqrt-coded relative to their maximum.
    std::vector<float> base(N, 0.0f);
    for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < N; ++c) base[c] = std::max(base[c], std::fabs(w[r * N + c]));
    float smax0 = 0.0f;
    for (int64_t c = 0; c < N; ++c) {
        base[c] = base[c] / zero;
        smax0 = std::max(smax0, base[c]);
    }
    std::vector<int> s(N);
    for (int64_t c = 0; c < N; ++c) {
        const float ratio = smax0 > 0.0f ? base[c] / smax0 : 0.0f;
        const float v = std::nearbyint(std::sqrt(ratio) * 16.0f);
        s[c] = (int)std::min(16.0f, std::max(1.0f, v));
        qscale_out[c] = (uint8_t)s[c];
    }
    // Factors p: an f32 grid, each scored with the fp16 scales the loader will compute.
    const float lo = (float)p_min, hi = (float)p_max;
    std::vector<double> score(p_steps);
    std::vector<float> smax_p(p_steps);
#pragma omp parallel if (R * N * p_steps >= kParallelMin)
    {
        std::vector<float> scale(N), acc(N);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < p_steps; ++i) {
            const float p = p_steps == 1 ? lo : lo + (hi - lo) * ((float)i / (float)(p_steps - 1));
            smax_p[i] = round_half(smax0 * p);
            const float factor = scale_factor(smax_p[i]);
            for (int64_t c = 0; c < N; ++c) scale[c] = scale_of(s[c], factor);
            score[i] = group_error(w, R, N, scale.data(), zero, maxq, norm, acc.data());
        }
    }
    int64_t best = 0;
    for (int64_t i = 1; i < p_steps; ++i)
        if (score[i] < score[best]) best = i;  // ties keep the first
    const float factor = scale_factor(smax_p[best]);
    for (int64_t c = 0; c < N; ++c) scale_out[c] = scale_of(s[c], factor);
    scale_max_out[0] = smax_p[best];
}

// GPTQ over columns [c0, c0+n) of one group: rows in order, each row's error pushed onto the
// later rows of the same columns.
EXL2_MULTIVERSION
void gptq_columns(float* w, const float* hinv, const float* scale, uint8_t* codes, float* err,
                  float* deq, int64_t g, int64_t N, int64_t c0, int64_t n, float zero, float maxq) {
    for (int64_t i = 0; i < g; ++i) {
        float* wi = w + i * N + c0;
        float* ei = err + i * N + c0;
        quantize_span(wi, scale + c0, codes + i * N + c0, deq, n, zero, maxq);
        const float d = hinv[i * g + i];
        for (int64_t c = 0; c < n; ++c) {
            ei[c] = (wi[c] - deq[c]) / d;
            wi[c] = deq[c];
        }
        for (int64_t j = i + 1; j < g; ++j) {
            const float h = hinv[i * g + j];
            float* wj = w + j * N + c0;
            for (int64_t c = 0; c < n; ++c) wj[c] -= h * ei[c];
        }
    }
}

void gptq_group(float* w, const float* hinv, const float* scale, uint8_t* codes, float* err,
                int64_t g, int64_t N, int bits) {
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
    // Columns are independent inside a group: each thread owns blocks of at most 128
    // columns (a 128 x 128 slice is 64 KiB, cache resident), as many blocks per thread.
    const int64_t threads = omp_get_max_threads();
    const int64_t nblocks = threads * ((N + threads * 128 - 1) / (threads * 128));
    const int64_t block = ((N + nblocks - 1) / nblocks + 15) / 16 * 16;
#pragma omp parallel if (g * g * N / 2 >= kParallelMin)
    {
        std::vector<float> deq(block);
#pragma omp for schedule(static, 1)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t c0 = b * block;
            if (c0 < N)
                gptq_columns(w, hinv, scale, codes, err, deq.data(), g, N, c0, std::min(block, N - c0), zero, maxq);
        }
    }
}

}  // namespace exl2
