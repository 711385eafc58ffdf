// Dequantization of a packed EXL2 linear and the fused dequant-and-multiply for small M.
#include <omp.h>

#include "common.h"
#include "kernels_cpu.h"

namespace exl2 {

namespace {

// Groups, the fp16-exact scale table [G, N] and the group index of each permuted row.
struct Layout {
    std::vector<Group> groups;
    std::vector<float> scales;
    std::vector<int32_t> group_of;
    int64_t max_rows = 0;

    Layout(const int32_t* q_scale, const uint16_t* q_scale_max, const int16_t* q_groups, int64_t K,
           int64_t N, int64_t n_pad, int64_t G)
        : groups(G), scales(G * N), group_of(K, 0) {
        read_groups(q_groups, G, K, groups.data());
        scale_table(q_scale, q_scale_max, G, N, n_pad, scales.data());
        for (int64_t g = 0; g < G; ++g) {
            max_rows = std::max(max_rows, groups[g].rows);
            for (int64_t r = groups[g].k_start; r < groups[g].k_start + groups[g].rows && r < K; ++r)
                group_of[r] = (int32_t)g;
        }
    }
};

}  // namespace

// One output row: codes of packed row i of a group -> (q - zero) * scale, f32 or f16.
EXL2_MULTIVERSION
void dequant_row(const uint32_t* group_words, int64_t n_pad, int bits, int64_t i, int64_t N,
                 const float* scale, uint32_t* codes, void* out, bool out_is_f16) {
    extract_row(group_words, n_pad, bits, i, N, codes);
    const float zero = (float)(1 << (bits - 1));
    if (out_is_f16) {
        uint16_t* o = static_cast<uint16_t*>(out);
        for (int64_t c = 0; c < N; ++c) o[c] = float_to_half(((float)codes[c] - zero) * scale[c]);
    } else {
        float* o = static_cast<float*>(out);
        for (int64_t c = 0; c < N; ++c) o[c] = ((float)codes[c] - zero) * scale[c];
    }
}

void dequant(const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
             const int16_t* q_groups, const int32_t* q_invperm, void* out, int64_t K, int64_t N,
             int64_t n_pad, int64_t G, bool out_is_f16) {
    const Layout lay(q_scale, q_scale_max, q_groups, K, N, n_pad, G);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(q_weight);
    const int64_t esize = out_is_f16 ? 2 : 4;
#pragma omp parallel if (K * N >= kParallelMin)
    {
        std::vector<uint32_t> codes(N);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; ++k) {
            // Output row k is original channel k = packed row invperm[k].
            const int64_t r = q_invperm[k];
            const int32_t g = lay.group_of[r];
            const Group& gr = lay.groups[g];
            dequant_row(words + gr.word_row * n_pad, n_pad, gr.bits, r - gr.k_start, N,
                        lay.scales.data() + (int64_t)g * N, codes.data(),
                        static_cast<char*>(out) + k * N * esize, out_is_f16);
        }
    }
}

// Codes of a group's rows for columns [c0, c0+nd) as floats (q - zero), NB per row;
// columns past nd stay zero.
template <int NB>
static inline void decode_group(const uint32_t* words, int64_t n_pad, const Group& gr, int64_t c0,
                                int64_t nd, float* q) {
    const float zero = (float)(1 << (gr.bits - 1));
    const uint32_t mask = (1u << gr.bits) - 1u;
    const uint32_t* gw = words + gr.word_row * n_pad + c0;
    for (int64_t i = 0; i < gr.rows; ++i) {
        const int64_t off = (int64_t)gr.bits * i;
        const uint32_t* w0 = gw + (off >> 5) * n_pad;
        const int sh = (int)(off & 31);
        float* qi = q + i * NB;
        if (sh + gr.bits <= 32) {
            for (int64_t c = 0; c < nd; ++c) qi[c] = (float)(int32_t)((w0[c] >> sh) & mask) - zero;
        } else {
            const uint32_t* w1 = w0 + n_pad;
            for (int64_t c = 0; c < nd; ++c)
                qi[c] = (float)(int32_t)(((w0[c] >> sh) | (w1[c] << (32 - sh))) & mask) - zero;
        }
        for (int64_t c = nd; c < NB; ++c) qi[c] = 0.0f;
    }
}

// The helpers below pass vectors by value only between inlined functions of this file.
#pragma GCC diagnostic ignored "-Wpsabi"

// GCC vector type of 16 floats: AVX-512 clones use one zmm, AVX2 two ymm, the baseline xmm.
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float* p) {
    v16f v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

// total[m0..m0+MT)[0..32) += scale * sum over the group's rows of x[m] * q[row]; the
// MT x 32 accumulators stay in registers. xt holds x transposed, Mp values per row.
template <int MT>
static inline void group_tile(const float* xt, int64_t Mp, int64_t m0, int64_t k0, int64_t rows,
                              const float* q, const float* scale, float* total) {
    v16f acc[MT][2];
    for (int mm = 0; mm < MT; ++mm) acc[mm][0] = acc[mm][1] = v16f{};
    for (int64_t i = 0; i < rows; ++i) {
        const float* xr = xt + (k0 + i) * Mp + m0;
        const v16f q0 = load16(q + i * 32), q1 = load16(q + i * 32 + 16);
        for (int mm = 0; mm < MT; ++mm) {
            acc[mm][0] += xr[mm] * q0;
            acc[mm][1] += xr[mm] * q1;
        }
    }
    const v16f s0 = load16(scale), s1 = load16(scale + 16);
    for (int mm = 0; mm < MT; ++mm) {
        float* t = total + (m0 + mm) * 32;
        const v16f t0 = load16(t) + acc[mm][0] * s0, t1 = load16(t + 16) + acc[mm][1] * s1;
        std::memcpy(t, &t0, sizeof(t0));
        std::memcpy(t + 16, &t1, sizeof(t1));
    }
}

// y columns [c0, c0+n) for all M rows. Inside a group the integer codes are accumulated
// against x and the group's scales applied once at its end.
EXL2_MULTIVERSION
void matmul_block(const float* xt, int64_t M, int64_t Mp, const uint32_t* words, int64_t n_pad,
                  const Group* groups, int64_t G, const float* scales, int64_t N, int64_t c0,
                  float* q, float* total, void* y, bool io_is_f16) {
    constexpr int NB = 32;
    const int64_t n = std::min<int64_t>(NB, N - c0), nd = std::min<int64_t>(NB, n_pad - c0);
    float sc[NB];
    for (int64_t i = 0; i < Mp * NB; ++i) total[i] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
        const Group& gr = groups[g];
        decode_group<NB>(words, n_pad, gr, c0, nd, q);
        for (int64_t c = 0; c < NB; ++c) sc[c] = c < n ? scales[g * N + c0 + c] : 0.0f;
        if (Mp >= 4) {
            for (int64_t m0 = 0; m0 < Mp; m0 += 4) group_tile<4>(xt, Mp, m0, gr.k_start, gr.rows, q, sc, total);
        } else {
            for (int64_t m0 = 0; m0 < Mp; ++m0) group_tile<1>(xt, Mp, m0, gr.k_start, gr.rows, q, sc, total);
        }
    }
    for (int64_t m = 0; m < M; ++m) {
        if (io_is_f16) {
            uint16_t* o = static_cast<uint16_t*>(y) + m * N + c0;
            for (int64_t c = 0; c < n; ++c) o[c] = float_to_half(total[m * NB + c]);
        } else {
            float* o = static_cast<float*>(y) + m * N + c0;
            for (int64_t c = 0; c < n; ++c) o[c] = total[m * NB + c];
        }
    }
}

void exl2_matmul(const void* x, const int32_t* q_weight, const int32_t* q_scale,
                 const uint16_t* q_scale_max, const int16_t* q_groups, const int32_t* q_perm, void* y,
                 int64_t M, int64_t K, int64_t N, int64_t n_pad, int64_t G, bool io_is_f16) {
    const Layout lay(q_scale, q_scale_max, q_groups, K, N, n_pad, G);
    // xt[r, m] = x[m, perm[r]]: activations in packed row order; M padded to a multiple of 4
    // (zeros) when M >= 4 so the 4-row tiles need no remainder loop.
    const int64_t Mp = M >= 4 ? (M + 3) / 4 * 4 : M;
    std::vector<float> xt(K * Mp, 0.0f);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < K; ++r) {
            const int64_t src = m * K + q_perm[r];
            xt[r * Mp + m] = io_is_f16 ? half_to_float(static_cast<const uint16_t*>(x)[src])
                                       : static_cast<const float*>(x)[src];
        }
    const uint32_t* words = reinterpret_cast<const uint32_t*>(q_weight);
    const int64_t nblocks = (N + 31) / 32;
#pragma omp parallel if (K * N >= kParallelMin)
    {
        std::vector<float> q(std::max<int64_t>(lay.max_rows, 1) * 32), total(Mp * 32);
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nblocks; ++b)
            matmul_block(xt.data(), M, Mp, words, n_pad, lay.groups.data(), G, lay.scales.data(), N, b * 32,
                         q.data(), total.data(), y, io_is_f16);
    }
}

}  // namespace exl2
