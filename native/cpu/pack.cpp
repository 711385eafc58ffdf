// Bit packing of codes (little-endian stream along K per column) and of 4-bit scale codes.
#include "common.h"
#include "kernels_cpu.h"

namespace exl2 {

void pack_codes(const uint8_t* codes, int32_t* out, int64_t R, int64_t N, int bits) {
    uint32_t* words = reinterpret_cast<uint32_t*>(out);
    const int64_t W = R * bits / 32;
    // A block of 32 rows fills exactly `bits` words, so blocks never share a word.
    const int64_t blocks = (R + 31) / 32;
#pragma omp parallel for schedule(static) if (R * N >= kParallelMin)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t w_first = b * bits, w_end = std::min<int64_t>(W, w_first + bits);
        for (int64_t w = w_first; w < w_end; ++w)
            std::memset(words + w * N, 0, sizeof(uint32_t) * N);
        const int64_t r_end = std::min<int64_t>(R, b * 32 + 32);
        for (int64_t i = b * 32; i < r_end; ++i) {
            const int64_t off = (int64_t)bits * i;
            uint32_t* w0 = words + (off >> 5) * N;
            const int sh = (int)(off & 31);
            const uint8_t* src = codes + i * N;
            for (int64_t c = 0; c < N; ++c) w0[c] |= (uint32_t)src[c] << sh;
            if (sh + bits > 32) {  // straddles: high bits open the next word
                uint32_t* w1 = w0 + N;
                for (int64_t c = 0; c < N; ++c) w1[c] |= (uint32_t)src[c] >> (32 - sh);
            }
        }
    }
}

void unpack_codes(const int32_t* packed, uint8_t* out, int64_t R, int64_t N, int bits) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
#pragma omp parallel if (R * N >= kParallelMin)
    {
        std::vector<uint32_t> row(N);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < R; ++i) {
            extract_row(words, N, bits, i, N, row.data());
            uint8_t* dst = out + i * N;
            for (int64_t c = 0; c < N; ++c) dst[c] = (uint8_t)row[c];
        }
    }
}

void pack_scales(const uint8_t* qscale, int32_t* out, int64_t G, int64_t N) {
    const int64_t NW = N / 8;
#pragma omp parallel for schedule(static) if (G * N >= kParallelMin)
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < NW; ++j) {
            const uint8_t* s = qscale + g * N + j * 8;
            uint32_t v = 0;
            for (int k = 0; k < 8; ++k) v |= (uint32_t)((s[k] - 1) & 15) << (4 * k);
            out[g * NW + j] = (int32_t)v;
        }
}

void unpack_scales(const int32_t* q_scale, uint8_t* out, int64_t G, int64_t N) {
    const int64_t NW = N / 8;
#pragma omp parallel for schedule(static) if (G * N >= kParallelMin)
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < NW; ++j) {
            const uint32_t v = (uint32_t)q_scale[g * NW + j];
            for (int k = 0; k < 8; ++k) out[g * N + j * 8 + k] = (uint8_t)(((v >> (4 * k)) & 15) + 1);
        }
}

Group* read_groups(const int16_t* q_groups, int64_t G, int64_t K, Group* out) {
    int64_t k = 0;
    for (int64_t g = 0; g < G; ++g) {
        out[g].bits = q_groups[2 * g];
        out[g].word_row = (uint16_t)q_groups[2 * g + 1];
        out[g].k_start = k;
        if (g + 1 < G)
            out[g].rows = ((int64_t)(uint16_t)q_groups[2 * g + 3] - out[g].word_row) * 32 / out[g].bits;
        else
            out[g].rows = K - k;
        k += out[g].rows;
    }
    return out;
}

void scale_table(const int32_t* q_scale, const uint16_t* q_scale_max, int64_t G, int64_t n,
                 int64_t n_pad, float* out) {
    const int64_t NW = n_pad / 8;
    for (int64_t g = 0; g < G; ++g) {
        const float factor = scale_factor(half_to_float(q_scale_max[g]));
        float lut[17];
        for (int s = 1; s <= 16; ++s) lut[s] = scale_of(s, factor);
        for (int64_t c = 0; c < n; ++c) {
            const uint32_t v = (uint32_t)q_scale[g * NW + c / 8];
            out[g * n + c] = lut[((v >> (4 * (c % 8))) & 15) + 1];
        }
    }
}

}  // namespace exl2
