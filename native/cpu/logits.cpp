// Per-token statistics of a logits matrix in one pass over the vocabulary: online
// log-sum-exp (fp32 chunks, double running sum), argmax, nll and top-k+tail KL divergence.
#include <cmath>
#include <limits>

#include "common.h"
#include "kernels_cpu.h"

namespace exl2 {

// exp(x) for x <= 0, to about 2 ulp; branch-free so the chunk loop vectorises.
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float k = rne(x * 1.44269504088896341f);
    const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_to_float((uint32_t)((int32_t)k + 127) << 23);
}

static inline float logit_at(const void* logits, bool f16, int64_t i) {
    return f16 ? half_to_float(static_cast<const uint16_t*>(logits)[i]) : static_cast<const float*>(logits)[i];
}

// One row: running max / sum of exp over chunks of CH values, the first argmax, then nll
// and the optional top-k + tail KLD from a few random reads.
EXL2_MULTIVERSION
void row_stats(const void* logits, bool f16, int64_t base, int64_t V, int64_t target, const int32_t* ref_idx,
               const float* ref_logp, int64_t k, float* buf, float* nll_out, int64_t* argmax_out,
               float* kld_out) {
    constexpr int64_t CH = 1024;
    float run_max = -std::numeric_limits<float>::infinity();
    double run_sum = 0.0;
    int64_t best = 0;
    for (int64_t c0 = 0; c0 < V; c0 += CH) {
        const int64_t n = std::min(CH, V - c0);
        if (f16) {
            const uint16_t* src = static_cast<const uint16_t*>(logits) + base + c0;
            for (int64_t i = 0; i < n; ++i) buf[i] = half_to_float(src[i]);
        } else {
            const float* src = static_cast<const float*>(logits) + base + c0;
            for (int64_t i = 0; i < n; ++i) buf[i] = src[i];
        }
        float cmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cmax)
        for (int64_t i = 0; i < n; ++i) cmax = buf[i] > cmax ? buf[i] : cmax;
        if (cmax > run_max) {  // strictly greater: the first maximum wins
            for (int64_t i = 0; i < n; ++i)
                if (buf[i] == cmax) {
                    best = c0 + i;
                    break;
                }
            if (run_sum > 0.0) run_sum *= std::exp((double)run_max - (double)cmax);
            run_max = cmax;
        }
        float csum = 0.0f;
#pragma omp simd reduction(+ : csum)
        for (int64_t i = 0; i < n; ++i) csum += exp_neg(buf[i] - run_max);
        run_sum += csum;
    }
    const double lse = (double)run_max + std::log(run_sum);
    *nll_out = (float)(lse - (double)logit_at(logits, f16, base + target));
    *argmax_out = best;
    if (kld_out) {
        double kl = 0.0, p_sum = 0.0, q_sum = 0.0;
        for (int64_t j = 0; j < k; ++j) {
            const double logp = ref_logp[j];
            const double logq = (double)logit_at(logits, f16, base + ref_idx[j]) - lse;
            const double p = std::exp(logp);
            kl += p * (logp - logq);
            p_sum += p;
            q_sum += std::exp(logq);
        }
        const double p_tail = std::max(1.0 - p_sum, 0.0);
        const double q_tail = std::max(1.0 - q_sum, 1e-10);
        if (p_tail > 0.0) kl += p_tail * (std::log(p_tail) - std::log(q_tail));
        *kld_out = (float)kl;
    }
}

void logit_stats(const void* logits, bool logits_is_f16, int64_t T, int64_t V, const int64_t* targets,
                 const int32_t* ref_idx, const float* ref_logp, int64_t k, float* nll_out,
                 int64_t* argmax_out, float* kld_out) {
#pragma omp parallel if (T * V >= kParallelMin)
    {
        std::vector<float> buf(1024);
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < T; ++t)
            row_stats(logits, logits_is_f16, t * V, V, targets[t], ref_idx ? ref_idx + t * k : nullptr,
                      ref_logp ? ref_logp + t * k : nullptr, k, buf.data(), nll_out + t, argmax_out + t,
                      kld_out ? kld_out + t : nullptr);
    }
}

}  // namespace exl2
