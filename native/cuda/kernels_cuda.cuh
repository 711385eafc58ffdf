// Launchers of the CUDA kernels (plain C++ interface; no pybind11 here).
// Pointers are device pointers; `stream` is a cudaStream_t passed as an integer.
// Every launcher checks its CUDA calls and launches and throws std::runtime_error
// ("<kernel>: <cuda error string>") on failure.
#pragma once
#include <cstdint>

namespace exl2cuda {

void pack_codes(const uint8_t* codes, int32_t* out, int64_t R, int64_t N, int bits, uintptr_t stream);
void unpack_codes(const int32_t* packed, uint8_t* out, int64_t R, int64_t N, int bits, uintptr_t stream);
void pack_scales(const uint8_t* qscale, int32_t* out, int64_t G, int64_t N, uintptr_t stream);
void unpack_scales(const int32_t* q_scale, uint8_t* out, int64_t G, int64_t N, uintptr_t stream);

void quantize_rows(const float* w, const float* scale, uint8_t* codes, float* deq, int64_t R, int64_t N,
                   int bits, uintptr_t stream);
void group_scale_search(const float* w, int64_t R, int64_t N, int bits, double p_min, double p_max,
                        int64_t p_steps, double norm, uint8_t* qscale_out, float* scale_out,
                        float* scale_max_out, uintptr_t stream);
void gptq_group(float* w, const float* hinv, const float* scale, uint8_t* codes, float* err, int64_t g,
                int64_t N, int bits, uintptr_t stream);

void dequant(const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
             const int16_t* q_groups, const int32_t* q_invperm, void* out, int64_t K, int64_t N,
             int64_t n_pad, int64_t G, bool out_is_f16, uintptr_t stream);

// cols_per_thread (1 or 2) and k_splits (1..8, >1 needs sm_90 clusters): 0 = choose.
// f16 x with 2 <= M <= 32 on sm_80+ runs the tensor-core kernel (matmul_tc.cu), M = 1 and f32 the
// SIMT kernel; flags 8 forces SIMT, 16 the tensor-core kernel (also at M = 1). flags (SIMT tuning): 1 = one unit of loads in flight per warp, 2 = no L2 prefetch, 4 = L2 prefetch of
// every unit of the warp (default: the first two units only); 0 = default.
void exl2_matmul(const void* x, const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
                 const int16_t* q_groups, const int32_t* q_perm, void* y, int64_t M, int64_t K, int64_t N,
                 int64_t n_pad, int64_t G, bool io_is_f16, uintptr_t stream, int cols_per_thread = 0,
                 int k_splits = 0, int flags = 0);

void logit_stats(const void* logits, bool logits_is_f16, int64_t T, int64_t V, const int64_t* targets,
                 const int32_t* ref_idx, const float* ref_logp, int64_t k, float* nll_out,
                 int64_t* argmax_out, float* kld_out, uintptr_t stream);

// The forward pass's fused f16 operations (forward.cu). rms_norm: out = norm(h) * w with
// h = x (residual null) or h = x + residual, then also written to h_out (may alias x).
// rope_cache: RoPE of q [B*T, H*D] in place and of k [B*T, Hkv*D] into k_cache, v into v_cache
// ([B, Hkv, max_len, D]) at positions pos[T] (device int64) or, when pos is null, start + t.
void rms_norm(const void* x, const void* residual, const float* w, void* out, void* h_out, int64_t rows,
              int64_t dim, float eps, uintptr_t stream);
void rope_cache(void* q, const void* k, const void* v, const void* cos_t, const void* sin_t, void* k_cache,
                void* v_cache, const int64_t* pos, int64_t start, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                int64_t D, int64_t max_len, uintptr_t stream);
void silu_mul(const void* g, const void* u, void* out, int64_t n, uintptr_t stream);
// One query token per sequence against the cache: q [B, H, D] -> out [B, H, D], keys 0..pos[0]
// of k_cache / v_cache [B, Hkv, L, D] (pos: device int64), scale 1 / sqrt(D); D <= 128, D % 8 == 0.
// With k_new (non-null; D % 16 == 0) it also does rope_cache's work for the token: q is unroped,
// and RoPE(k_new) and v_new [B, Hkv, D] (cos / sin: the position's rows [D]) are stored into the
// caches at pos[0] and attended to there.
void decode_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* pos, void* out,
                      int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int sms, uintptr_t stream,
                      const void* k_new = nullptr, const void* v_new = nullptr, const void* cos_t = nullptr,
                      const void* sin_t = nullptr);

// Device facts used by the launchers (and reported by the benchmarks).
int device_sm_count();
int device_cc_major();
int device_smem_optin();
int device_smem_per_sm();    // shared memory of one SM, all blocks together
int device_smem_reserved();  // shared memory the system takes per resident block

}  // namespace exl2cuda
