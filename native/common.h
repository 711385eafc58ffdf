// Shared helpers of the exl2build CPU kernels: raw-pointer casts, software fp16 and the
// EXL2 scale/bit-stream arithmetic. Written branch-free where it sits in inner loops so
// gcc can vectorise the callers at -O3.
#pragma once
// FP traps are never enabled here; without this gcc keeps branches around float compares
// and divisions instead of vectorising them.
#pragma GCC optimize("no-trapping-math")
#include <cstdint>
#include <cstring>

// Hot loops are compiled for AVX-512, AVX2 and the baseline and picked at load time
// (the build targets x86-64-v2). Kept off functions holding OpenMP regions: the outlined
// region bodies would not inherit the clone's target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EXL2_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EXL2_MULTIVERSION
#endif

namespace exl2 {

// Below this many elements of work a kernel runs on one thread: waking the OpenMP team
// costs more than it saves (and much more on an oversubscribed machine).
constexpr int64_t kParallelMin = 1 << 16;

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// c ? a : b as bit masks: no branch for the vectoriser to give up on.
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
    const uint32_t m = 0u - (uint32_t)c;
    return (a & m) | (b & ~m);
}

// fp16 -> fp32, exact for every value (normals, subnormals, inf, nan). Integer selects
// only, so loops over it vectorise.
inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu, e = h & 0x7c00u;
    const uint32_t normal = (em << 13) + (112u << 23);  // rebias 15 -> 127
    const uint32_t inf_nan = normal + (112u << 23);
    // Subnormal: mantissa * 2^-24, exact in fp32.
    const uint32_t sub = float_to_bits((float)(int32_t)em * 5.9604644775390625e-08f);
    uint32_t o = select(e == 0x7c00u, inf_nan, normal);
    o = select(e == 0, sub, o);
    return bits_to_float(o | sign);
}

// fp32 -> fp16 with round-to-nearest-even (overflow -> inf, nan stays nan).
inline uint16_t float_to_half(float f) {
    uint32_t x = float_to_bits(f);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    // Normal result: drop 13 mantissa bits with the rounding bias 0xfff (+1 when odd).
    const uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
    // Subnormal result: an fp32 add of 0.5 aligns the mantissa to steps of 2^-24 (the fp16
    // subnormal step) with round-to-nearest-even.
    const uint32_t magic = 126u << 23;
    const uint32_t sub = float_to_bits(bits_to_float(x) + 0.5f) - magic;
    const uint32_t inf_nan = select(x > 0x7f800000u, 0x7e00u, 0x7c00u);
    uint32_t o = select(x < (113u << 23), sub, normal);
    o = select(x >= (143u << 23), inf_nan, o);
    return (uint16_t)(o | (sign >> 16));
}

inline float round_half(float f) { return half_to_float(float_to_half(f)); }

// The loader's fp16 constant factor half(q_scale_max) * half(1/256), as a float.
inline float scale_factor(float scale_max_half) {
    return round_half(round_half(scale_max_half) * (1.0f / 256.0f));
}

// Scale of code s in 1..16: half(s*s) * factor (s*s is exact in fp16).
inline float scale_of(int s, float factor) { return round_half((float)(s * s) * factor); }

// Round to nearest even for |x| < 2^22 (callers clamp first); vectorises unlike nearbyintf.
inline float rne(float x) { return (x + 12582912.0f) - 12582912.0f; }

// Symmetric quantization of one value; zero scale (fp16 underflow) gives the zero code.
inline float quant_code(float w, float scale, float zero, float maxq) {
    // Divide unconditionally (by 1 where the scale is zero) so the loop stays branch-free.
    const bool ok = scale > 0.0f;
    float r = w / (ok ? scale : 1.0f);
    r = ok ? r : 0.0f;
    r = r < -512.0f ? -512.0f : (r > 512.0f ? 512.0f : r);
    float q = rne(r) + zero;
    return q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
}

// One group of a QTensor, rebuilt from q_groups.
struct Group {
    int bits;
    int64_t word_row;  // first row inside q_weight
    int64_t k_start;   // first (permuted) K row
    int64_t rows;
};

// Groups from the int16 q_groups pairs; rows of the last group are K minus the rest.
Group* read_groups(const int16_t* q_groups, int64_t G, int64_t K, Group* out);

// Scale table [G, n] (fp16-exact values as f32) from packed q_scale [G, n_pad/8].
void scale_table(const int32_t* q_scale, const uint16_t* q_scale_max, int64_t G, int64_t n,
                 int64_t n_pad, float* out);

// Codes of row i (within a bit stream) for n columns as unsigned values.
inline void extract_row(const uint32_t* words, int64_t stride, int bits, int64_t i, int64_t n,
                        uint32_t* out) {
    const int64_t off = (int64_t)bits * i;
    const uint32_t* w0 = words + (off >> 5) * stride;
    const int sh = (int)(off & 31);
    const uint32_t mask = (1u << bits) - 1u;
    if (sh + bits <= 32) {
        for (int64_t c = 0; c < n; ++c) out[c] = (w0[c] >> sh) & mask;
    } else {
        const uint32_t* w1 = w0 + stride;
        for (int64_t c = 0; c < n; ++c) out[c] = ((w0[c] >> sh) | (w1[c] << (32 - sh))) & mask;
    }
}

}  // namespace exl2
