// Bit packing of codes (little-endian bit stream along K per column) and of the 4-bit
// scale codes, on the GPU. Same results as exl2build/kernels_ref.py, bit for bit.
#include "common.cuh"
#include "kernels_cuda.cuh"

namespace exl2cuda {

// One thread per output word (w, n): OR in every value that overlaps bits [32w, 32w+32).
__global__ void pack_codes_kernel(const uint8_t* __restrict__ codes, uint32_t* __restrict__ out, int64_t W,
                                  int64_t N, int bits) {
    const int64_t total = W * N;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t w = idx / N, n = idx - w * N;
        const int64_t bit0 = 32 * w;
        const int64_t i0 = bit0 / bits, i1 = (bit0 + 31) / bits;
        uint32_t word = 0;
        for (int64_t i = i0; i <= i1; ++i) {
            const uint32_t v = codes[i * N + n];
            const int64_t off = i * bits - bit0;
            word |= off >= 0 ? (v << off) : (v >> (-off));
        }
        out[idx] = word;
    }
}

// One thread per (row, column).
__global__ void unpack_codes_kernel(const uint32_t* __restrict__ packed, uint8_t* __restrict__ out, int64_t R,
                                    int64_t N, int bits) {
    const int64_t total = R * N;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / N, n = idx - r * N;
        const int64_t off = r * bits;
        const int64_t w = off >> 5;
        const int s = (int)(off & 31);
        uint32_t v = packed[w * N + n] >> s;
        if (s + bits > 32) v |= packed[(w + 1) * N + n] << (32 - s);
        out[idx] = (uint8_t)(v & mask);
    }
}

__global__ void pack_scales_kernel(const uint8_t* __restrict__ qscale, uint32_t* __restrict__ out, int64_t G,
                                   int64_t NW) {
    const int64_t total = G * NW;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const uint8_t* s = qscale + idx * 8;  // row g, words j: qscale[g*N + 8j] = qscale[8*idx]
        uint32_t v = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) v |= ((uint32_t)(s[k] - 1) & 15u) << (4 * k);
        out[idx] = v;
    }
}

__global__ void unpack_scales_kernel(const uint32_t* __restrict__ q_scale, uint8_t* __restrict__ out,
                                     int64_t total) {
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const uint32_t w = q_scale[idx >> 3];
        out[idx] = (uint8_t)(((w >> (4 * (idx & 7))) & 15u) + 1u);
    }
}

void pack_codes(const uint8_t* codes, int32_t* out, int64_t R, int64_t N, int bits, uintptr_t stream) {
    const int64_t W = R * bits / 32;
    if (W * N == 0) return;
    pack_codes_kernel<<<grid_for(W * N, 256), 256, 0, as_stream(stream)>>>(codes, reinterpret_cast<uint32_t*>(out),
                                                                            W, N, bits);
    check_launch("pack_codes");
}

void unpack_codes(const int32_t* packed, uint8_t* out, int64_t R, int64_t N, int bits, uintptr_t stream) {
    if (R * N == 0) return;
    unpack_codes_kernel<<<grid_for(R * N, 256), 256, 0, as_stream(stream)>>>(
        reinterpret_cast<const uint32_t*>(packed), out, R, N, bits);
    check_launch("unpack_codes");
}

void pack_scales(const uint8_t* qscale, int32_t* out, int64_t G, int64_t N, uintptr_t stream) {
    const int64_t NW = N / 8;
    if (G * NW == 0) return;
    pack_scales_kernel<<<grid_for(G * NW, 256), 256, 0, as_stream(stream)>>>(qscale, reinterpret_cast<uint32_t*>(out),
                                                                              G, NW);
    check_launch("pack_scales");
}

void unpack_scales(const int32_t* q_scale, uint8_t* out, int64_t G, int64_t N, uintptr_t stream) {
    const int64_t total = G * (N / 8) * 8;
    if (total == 0) return;
    unpack_scales_kernel<<<grid_for(total, 256), 256, 0, as_stream(stream)>>>(
        reinterpret_cast<const uint32_t*>(q_scale), out, total);
    check_launch("unpack_scales");
}

}  // namespace exl2cuda
