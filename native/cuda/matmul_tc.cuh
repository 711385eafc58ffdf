// The tensor-core EXL2 matmul (matmul_tc.cu), called by exl2_matmul for f16 activations.
#pragma once
#include <cstdint>

namespace exl2cuda {

// y = x @ W for f16 x and y, 1 <= M <= 32, on sm_80+. Returns false (nothing launched) when
// it does not apply: older GPU, M out of range, q_weight not 16-byte aligned, or K too large
// for shared memory. k_splits: 0 = choose, else 1..8 (sm_90 clusters).
bool exl2_matmul_tc(const void* x, const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
                    const int16_t* q_groups, const int32_t* q_perm, void* y, int64_t M, int64_t K, int64_t N,
                    int64_t n_pad, int64_t G, uintptr_t stream, int sms, int cc_major, int smem_optin, int k_splits);

// W^T [K, N] in fp16, original row order, from the unit tables (exl2build.kernels.unit_tables:
// unit_meta int4 [U], unit_perm [U * 32]). Returns false (nothing launched) when q_weight or out
// is not 16-byte aligned or U > 65535.
bool dequant_units(const int32_t* q_weight, const int32_t* q_scale, const int32_t* unit_meta,
                   const int32_t* unit_perm, void* out, int64_t N, int64_t n_pad, int64_t U, uintptr_t stream);

}  // namespace exl2cuda
