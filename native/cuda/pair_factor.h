// Where the EXL2 decoders of tc_decode.cuh leave each code: a plain header, so that the host
// bindings can expose the table and the tests can hold exl2build.kernels' copy (unit_perm's packed
// factors) to it.
#pragma once
#include <cstdint>

namespace exl2cuda {

// A lane's codes r and r + 4 of a column form one fp16 pair: code r in the low half, code r + 4 in
// the high half (h = 0, 1). decode_pairs masks each code where it lies, at bit log2(F) of its half,
// so the half reads 1024 + F * code. F = pair_factor<B>(r, h), a power of two (1 where the code had
// to be moved down to bit 0 to stay clear of the exponent bits). The two halves of a pair may
// differ (3 bits): each K slot has its own F.
template <int B>
#ifdef __CUDACC__
__host__ __device__
#endif
constexpr uint32_t pair_factor(int r, int h) {
    if constexpr (B == 2) return 1u << (2 * r);
    if constexpr (B == 3) return r == 2 ? (h ? 4u : 64u) : (h ? 1u : 16u);
    if constexpr (B == 4) return (r & 1) ? 16u : 1u;
    if constexpr (B == 5) return r == 1 ? 32u : 1u;
    if constexpr (B == 6) return r == 2 ? 16u : 1u;
    return 1u;
}

// The same for a width known only at run time (1 for a width the decoders do not have).
#ifdef __CUDACC__
__host__ __device__
#endif
inline uint32_t pair_factor_of(int bits, int r, int h) {
    switch (bits) {
        case 2: return pair_factor<2>(r, h);
        case 3: return pair_factor<3>(r, h);
        case 4: return pair_factor<4>(r, h);
        case 5: return pair_factor<5>(r, h);
        case 6: return pair_factor<6>(r, h);
        default: return 1u;
    }
}

}  // namespace exl2cuda
