// How fast can a warp-per-64-columns kernel stream EXL2-shaped weights, with no decoding at all?
//
// The decode-sized matmul (native/cuda/matmul_gemv.cu) reaches ~70 % of copy bandwidth at one token
// on the largest Llama linear, and neither more stages, nor a contiguous layout, nor unrolling moved
// it (benchmarks/RESULTS.md). This probe takes the math away and keeps the streaming: each warp
// reads its 64 columns (256 bytes per word row) of B word rows per 32-row unit, through a ring of
// shared-memory stages, for the grid the kernel would launch. Three ways to fill a stage:
//   ldgsts:    cp.async 16 bytes per lane (as the kernel does: 2 word rows per instruction);
//   bulk-row:  one cp.async.bulk (TMA, 1-D) of 256 bytes per word row, completing on an mbarrier;
//   bulk-tile: the weights laid out as [64-column tile][word row][64 words] (a load-time repack),
//              so a stage of G units is one contiguous bulk copy of G * B * 256 bytes.
// and two references: a plain 16-byte-load read of the whole buffer, and cudaMemcpy D2D.
// A stage is consumed by one 16-byte shared load per lane and row, xor-ed into a sum that is
// written out (so nothing is optimised away). Blocks are held to 4 per SM, as the kernel's registers hold them. Build and run on an sm_90 GPU:
//   nvcc -std=c++17 -O3 -arch=sm_90 -o /tmp/stream_probe benchmarks/stream_probe.cu && /tmp/stream_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                  \
        }                                                                                  \
    } while (0)

constexpr int W = 4;            // warps per block
constexpr int MAXS = 16;        // most stages per warp
constexpr int ROW = 256;        // bytes of one word row of a warp's 64 columns

struct Shape {
    int rows, n_pad, bits, ks;  // word rows of q_weight, columns, rows per unit, K splits
};

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ uint64_t evict_first() {
    uint64_t p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// Units [u0, u1) of this warp's K range (each block's warps share the range, as in the kernel).
__device__ __forceinline__ void unit_range(const Shape& s, int& u0, int& u1) {
    const int U = s.rows / s.bits;
    u0 = (int)((long long)U * blockIdx.y / s.ks);
    u1 = (int)((long long)U * (blockIdx.y + 1) / s.ks);
}

__device__ __forceinline__ uint32_t consume(unsigned stage, int rows, int lane) {
    uint32_t acc = 0;
    for (int r = 0; r < rows; ++r) {
        uint4 v;
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "r"(stage + r * ROW + 16 * (lane & 15)));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    return acc;
}

// ---- ldgsts: cp.async 16 bytes per lane, lanes 0-15 one word row, 16-31 the next ----
template <int S>
__global__ void __launch_bounds__(W * 32) k_ldgsts(const char* __restrict__ w, Shape s, uint32_t* out) {
    extern __shared__ __align__(128) unsigned char sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col_bytes = (blockIdx.x * W + warp) * ROW;
    const unsigned ring = smem_addr(sm) + warp * S * s.bits * ROW;
    const uint64_t pol = evict_first();
    int u0, u1;
    unit_range(s, u0, u1);
    const size_t row_bytes = (size_t)s.n_pad * 4;
    auto issue = [&](int u, int slot) {
        const unsigned st = ring + slot * s.bits * ROW;
        for (int r = lane >> 4; r < s.bits; r += 2) {
            const char* src = w + (size_t)(u * s.bits + r) * row_bytes + col_bytes + 16 * (lane & 15);
            asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(st + r * ROW + 16 * (lane & 15)),
                         "l"(src), "l"(pol));
        }
    };
    for (int i = 0; i < S - 1; ++i) {
        if (u0 + i < u1) issue(u0 + i, i);
        asm volatile("cp.async.commit_group;");
    }
    uint32_t acc = 0;
    for (int u = u0, slot = 0; u < u1; ++u, slot = slot + 1 == S ? 0 : slot + 1) {
        asm volatile("cp.async.wait_group %0;" ::"n"(S - 2));
        __syncwarp();
        const int v = u + S - 1;
        if (v < u1) issue(v, (slot + S - 1) % S);
        asm volatile("cp.async.commit_group;");
        acc ^= consume(ring + slot * s.bits * ROW, s.bits, lane);
    }
    asm volatile("cp.async.wait_group 0;");
    if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the reads alive
}

// ---- bulk copies into stages that complete on one mbarrier each ----
__device__ __forceinline__ void mbar_init(unsigned bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar));
}
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar, uint64_t pol) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(pol) : "memory");
}

// TILE: the buffer is [tile][word row][ROW bytes]; a stage holds G units (one copy when TILE, else one
// copy per word row).
template <int S, bool TILE, int G>
__global__ void __launch_bounds__(W * 32) k_bulk(const char* __restrict__ w, Shape s, uint32_t* out) {
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) uint64_t bars[W][MAXS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tile = blockIdx.x * W + warp;
    const unsigned stage_bytes = G * s.bits * ROW;
    const unsigned ring = smem_addr(sm) + warp * S * stage_bytes;
    const unsigned bar0 = smem_addr(&bars[warp][0]);
    if (lane < S) mbar_init(bar0 + 8 * lane);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
    const uint64_t pol = evict_first();
    int u0, u1;
    unit_range(s, u0, u1);
    const int n = (u1 - u0 + G - 1) / G;  // stages of this warp
    const size_t row_bytes = (size_t)s.n_pad * 4;
    auto issue = [&](int i, int slot) {  // stage i: units u0 + G i ..
        const int ua = u0 + G * i, ub = min(ua + G, u1);
        const unsigned bytes = (ub - ua) * s.bits * ROW, st = ring + slot * stage_bytes, bar = bar0 + 8 * slot;
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the stage's reads before the refill
        if (lane == 0) mbar_expect(bar, bytes);
        __syncwarp();
        if (TILE) {
            if (lane == 0) bulk_copy(st, w + ((size_t)tile * s.rows + (size_t)ua * s.bits) * ROW, bytes, bar, pol);
        } else {
            const int rows = (ub - ua) * s.bits;
            for (int r = lane; r < rows; r += 32)
                bulk_copy(st + r * ROW, w + (size_t)(ua * s.bits + r) * row_bytes + (size_t)tile * ROW, ROW, bar, pol);
        }
    };
    for (int i = 0; i < S && i < n; ++i) issue(i, i);
    uint32_t acc = 0;
    for (int i = 0; i < n; ++i) {
        const int slot = i % S;
        mbar_wait(bar0 + 8 * slot, (i / S) & 1);
        const int ua = u0 + G * i, ub = min(ua + G, u1);
        acc ^= consume(ring + slot * stage_bytes, (ub - ua) * s.bits, lane);
        __syncwarp();  // the stage is read before it is refilled
        if (i + S < n) issue(i + S, slot);
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}

// ---- reference: every thread reads 16 bytes at a time, 4 loads in flight ----
__global__ void k_read(const uint4* __restrict__ p, size_t n16, uint32_t* out) {
    uint32_t acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    for (; i < n16; i += stride) acc ^= __ldcs(p + i).x;
    if (acc == 0x9e3779b9u) out[0] = acc;
}

template <class F>
float time_us(F launch, int iters) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    launch(0);
    CK(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int r = 0; r < 5; ++r) {
        CK(cudaEventRecord(a));
        for (int i = 0; i < iters; ++i) launch(i);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1000.0f / iters);
    }
    std::sort(t.begin(), t.end());
    CK(cudaGetLastError());
    return t[2];
}

int main() {
    int dev = 0, sms = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    std::printf("card: %s, %d SMs\n", prop.name, sms);
    const size_t cap = (size_t)1 << 30;  // two copies of the largest linear, beyond L2
    char* buf[2];
    for (auto& b : buf) {
        CK(cudaMalloc(&b, cap));
        CK(cudaMemset(b, 1, cap));
    }
    uint32_t* out;
    CK(cudaMalloc(&out, 4));
    char* dst;
    CK(cudaMalloc(&dst, cap));
    const float t_copy = time_us([&](int i) { CK(cudaMemcpyAsync(dst, buf[i & 1], cap, cudaMemcpyDeviceToDevice)); }, 10);
    const double copy_gbs = 2.0 * cap / t_copy / 1e3;
    const float t_read = time_us([&](int i) { k_read<<<sms * 8, 256>>>((const uint4*)buf[i & 1], cap / 16, out); }, 10);
    const double read_gbs = (double)cap / t_read / 1e3;
    std::printf("copy (read + write) %.0f GB/s; plain read %.0f GB/s\n\n", copy_gbs, read_gbs);
    std::printf("| shape (K x N, bits) | K splits | blocks | way | stages | us | GB/s | / plain read | / copy |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    struct Case { int K, N, bits; };
    const Case cases[] = {{8192, 28672, 4}, {8192, 28672, 2}, {8192, 28672, 3}, {4096, 22016, 4}, {11008, 4096, 4}, {4096, 4096, 4}};
    for (const Case& c : cases) {
        for (int ks : {1, 2, 4, 8, 16}) {
            Shape s{c.K * c.bits / 32, c.N, c.bits, ks};
            const size_t bytes = (size_t)s.rows * s.n_pad * 4;
            const int tiles = c.N / 64;
            if (tiles % W || bytes > cap) continue;
            const long long blocks = (long long)(tiles / W) * ks;
            if (blocks < sms || blocks > 8LL * sms) continue;  // the launches the kernel would consider
            dim3 grid(tiles / W, ks);
            auto row = [&](const char* way, int S, float us) {
                const double gbs = bytes / us / 1e3;
                std::printf("| %dx%d, %d-bit | %d | %lld | %s | %d | %.1f | %.0f | %.2f | %.2f |\n", c.K, c.N, c.bits, ks,
                            blocks, way, S, us, gbs, gbs / read_gbs, gbs / copy_gbs);
            };
            const int iters = 20;
            // At most 4 blocks per SM, as the kernel's registers allow (padding the shared memory).
            const size_t pad = prop.sharedMemPerMultiprocessor / 4 - 2048;
            auto fit = [&](size_t need) { return std::max(need, pad); };
            // One way of filling the stages: its kernel, with `units` units per stage and S stages per warp.
            auto way = [&](const char* name, auto kern, int S, int units) {
                const size_t smem = fit((size_t)W * S * units * c.bits * ROW);
                CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
                row(name, S, time_us([&](int i) { kern<<<grid, W * 32, smem>>>(buf[i & 1], s, out); }, iters));
            };
            way("ldgsts", k_ldgsts<6>, 6, 1);
            way("ldgsts", k_ldgsts<12>, 12, 1);
            way("bulk-row", k_bulk<6, false, 1>, 6, 1);
            way("bulk-row", k_bulk<12, false, 1>, 12, 1);
            way("bulk-tile, 1 unit", k_bulk<6, true, 1>, 6, 1);
            way("bulk-tile, 4 units", k_bulk<4, true, 4>, 4, 4);
        }
    }
    return 0;
}
