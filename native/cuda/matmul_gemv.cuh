// The decode-sized tensor-core EXL2 matmul (matmul_gemv.cu), called by exl2build.kernels for
// f16 activations with M <= 32 (kernels.GEMV_MAX_ROWS decides where it is the default).
#pragma once
#include <cstdint>

namespace exl2cuda {

// y = x @ W for f16 x [M, K] and y [M, N], 1 <= M <= 32, on sm_90. unit_meta (int32 [U, 4]) and
// unit_perm (int32 [U * 32]) are the per-unit tables of exl2build.kernels.unit_tables; max_bits is
// the largest bit width of the linear; unit_bits (host memory, U entries, or null for one width)
// each unit's width, for the K split. Returns false (nothing launched) when it does not apply:
// older GPU, M out of range, misaligned tensors, or too little shared memory.
// warps: 2 or 4 per block (0 = 4); k_splits: 0 = choose, else 1..16; k_warps: the block's warps
// along K (0 = choose, else 1, 2 or 4 dividing warps).
bool exl2_matmul_gemv(const void* x, const int32_t* q_weight, const int32_t* q_scale, const int32_t* unit_meta,
                      const int32_t* unit_perm, void* y, int64_t M, int64_t K, int64_t N, int64_t n_pad, int64_t U,
                      int max_bits, const uint8_t* unit_bits, uintptr_t stream, int sms, int cc_major,
                      int smem_optin, int warps = 0, int k_splits = 0, int k_warps = 0);

// One launch for up to 3 linears that read the same x (q, k, v; gate, up): y_l = x @ W_l for each.
struct GemvLinearDesc {
    const int32_t* q_weight;
    const int32_t* q_scale;
    const int32_t* unit_meta;
    const int32_t* unit_perm;
    void* y;
    int64_t N, n_pad, U;
    int max_bits;
    const uint8_t* unit_bits;  // host memory: each unit's width where they differ (the K split), else null
};

// x_up (f16 [M, K], or null): the product's x is silu(x) * x_up instead, with silu_mul's roundings,
// computed as x is staged (the SwiGLU MLP's down projection without a separate silu_mul launch).
bool exl2_matmul_gemv_group(const void* x, const GemvLinearDesc* lins, int count, int64_t M, int64_t K,
                            uintptr_t stream, int sms, int cc_major, int smem_optin, int warps = 0,
                            int k_splits = 0, int k_warps = 0, const void* x_up = nullptr);

#ifdef EXL2BUILD_PHASE_PROBE
// The diagnostic build's phase stamps of the last launches, [GV_PROBE_BLOCKS][GV_PROBE_SLOTS] u64,
// copied to device memory at dst (then zeroed when clear). Slots: 0/1 global timer (ns) at entry /
// exit, 2-6 SM clock at entry, after the grid-dependency wait, after the prologue, after warp 0's
// unit loop, at exit; 7 the SM's id.
void gemv_phase_copy(void* dst, bool clear, uintptr_t stream);
#endif

}  // namespace exl2cuda
