// Declarations of the CPU kernels (pointer + size interfaces; see bind_cpu.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace exl2 {

void pack_codes(const uint8_t* codes, int32_t* out, int64_t R, int64_t N, int bits);
void unpack_codes(const int32_t* packed, uint8_t* out, int64_t R, int64_t N, int bits);
void pack_scales(const uint8_t* qscale, int32_t* out, int64_t G, int64_t N);
void unpack_scales(const int32_t* q_scale, uint8_t* out, int64_t G, int64_t N);

void quantize_rows(const float* w, const float* scale, uint8_t* codes, float* deq, int64_t R,
                   int64_t N, int bits);
void group_scale_search(const float* w, int64_t R, int64_t N, int bits, double p_min, double p_max,
                        int64_t p_steps, double norm, uint8_t* qscale_out, float* scale_out,
                        float* scale_max_out);
void gptq_group(float* w, const float* hinv, const float* scale, uint8_t* codes, float* err,
                int64_t g, int64_t N, int bits);

void dequant(const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
             const int16_t* q_groups, const int32_t* q_invperm, void* out, int64_t K, int64_t N,
             int64_t n_pad, int64_t G, bool out_is_f16);
void exl2_matmul(const void* x, const int32_t* q_weight, const int32_t* q_scale,
                 const uint16_t* q_scale_max, const int16_t* q_groups, const int32_t* q_perm, void* y,
                 int64_t M, int64_t K, int64_t N, int64_t n_pad, int64_t G, bool io_is_f16);

void logit_stats(const void* logits, bool logits_is_f16, int64_t T, int64_t V, const int64_t* targets,
                 const int32_t* ref_idx, const float* ref_logp, int64_t k, float* nll_out,
                 int64_t* argmax_out, float* kld_out);

}  // namespace exl2
