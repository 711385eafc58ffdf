// Shared helpers of the CUDA kernels: error checks, stream casts, the EXL2 group table.
#pragma once
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace exl2cuda {

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
    }
}
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-size helper: at most `cap` blocks of `threads` for n items (grid-stride kernels).
inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535LL * 16) {
    int64_t b = cdiv(n, threads);
    if (b < 1) b = 1;
    if (b > cap) b = cap;
    return (unsigned)b;
}

// Temporary device memory from the stream-ordered pool, freed on the stream.
struct StreamBuffer {
    void* p = nullptr;
    cudaStream_t s;
    StreamBuffer(size_t bytes, cudaStream_t stream, const char* what) : s(stream) {
        check(cudaMallocAsync(&p, bytes ? bytes : 16, stream), what);
    }
    ~StreamBuffer() {
        if (p) cudaFreeAsync(p, s);
    }
    StreamBuffer(const StreamBuffer&) = delete;
    StreamBuffer& operator=(const StreamBuffer&) = delete;
};

// ---------------------------------------------------------------------------------------
// The group table of a packed linear, built in shared memory by a whole block.
// For groups g in [0, G): bits[g], qrow[g] (first row inside q_weight), row[g] (first
// permuted K row), unit[g] (first 32-row unit; a group has ceil(rows/32) units, only the
// last may be short). row[G] = K, unit[G] = total units.
struct GroupTable {
    int* bits;
    int* qrow;
    int* row;
    int* unit;
};

// Shared-memory ints needed by build_group_table (table + scan scratch).
__host__ __device__ inline int64_t group_table_ints(int64_t G) { return 4 * G + 2 + 64; }

__device__ inline GroupTable group_table_at(int* base, int G) {
    GroupTable t;
    t.bits = base;
    t.qrow = base + G;
    t.row = base + 2 * G;
    t.unit = base + 3 * G + 1;
    return t;
}

// Call with all threads of the block; ends with __syncthreads().
__device__ inline GroupTable build_group_table(const int16_t* __restrict__ q_groups, int G, int K, int* smem) {
    GroupTable t = group_table_at(smem, G);
    int* scratch = smem + 4 * G + 2;  // 64 ints: per-warp totals of rows and units
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int per = (G + nt - 1) / nt;
    const int g0 = min(G, tid * per), g1 = min(G, g0 + per);
    int srows = 0, sunits = 0;
    for (int g = g0; g < g1; ++g) {
        const int b = (int)(uint16_t)q_groups[2 * g];
        const int q = (int)(uint16_t)q_groups[2 * g + 1];
        t.bits[g] = b;
        t.qrow[g] = q;
        if (g + 1 < G && b > 0) {
            const int rows = ((int)(uint16_t)q_groups[2 * g + 3] - q) * 32 / b;
            srows += rows;
            sunits += (rows + 31) / 32;
        }
    }
    // Block exclusive scan of (srows, sunits).
    int ir = srows, iu = sunits;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int r = __shfl_up_sync(0xffffffffu, ir, o), u = __shfl_up_sync(0xffffffffu, iu, o);
        if (lane >= o) { ir += r; iu += u; }
    }
    if (lane == 31) { scratch[warp] = ir; scratch[32 + warp] = iu; }
    __syncthreads();
    int offr = ir - srows, offu = iu - sunits;
    for (int w = 0; w < warp; ++w) { offr += scratch[w]; offu += scratch[32 + w]; }
    (void)nw;
    for (int g = g0; g < g1; ++g) {
        const int b = t.bits[g];
        const int rows = (g + 1 < G) ? (b > 0 ? (t.qrow[g + 1] - t.qrow[g]) * 32 / b : 0) : K - offr;
        t.row[g] = offr;
        t.unit[g] = offu;
        offr += rows;
        offu += (rows + 31) / 32;
        if (g == G - 1) { t.row[G] = K; t.unit[G] = offu; }
    }
    if (G == 0 && tid == 0) { t.row[0] = K; t.unit[0] = 0; }
    __syncthreads();
    return t;
}

// Largest g in [0, G) with a[g] <= v (a nondecreasing); 0 if none.
__device__ inline int find_le(const int* a, int G, int v) {
    int lo = 0, hi = G - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (a[mid] <= v) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The loader's fp16 scale: half(s*s) * (half(scale_max) * half(1/256)).
__device__ inline float exl2_scale(int s, __half smax) {
    const __half s2 = __float2half_rn((float)(s * s));
    return __half2float(__hmul(s2, __hmul(smax, __float2half_rn(1.0f / 256.0f))));
}
__device__ inline int scale_code(const int32_t* __restrict__ q_scale, int g, int n, int n_pad) {
    const uint32_t w = (uint32_t)__ldg(q_scale + (int64_t)g * (n_pad / 8) + (n >> 3));
    return (int)((w >> (4 * (n & 7))) & 15u) + 1;
}

// The K-split reduction of the fused matmuls: entry i of every block's `part` (same shared offset
// in each block of the cluster) summed over the cluster's ks blocks in rank order, so the result
// does not depend on timing; block r sums and writes (write(i, sum)) the entries with i % ks == r.
// Call with every thread (stride threads per block) of every block of the cluster; sm_90 only.
template <class Write>
__device__ __forceinline__ void cluster_reduce(float* part, int count, int ks, int stride, Write write) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    const int r = (int)cl.block_rank();
    // Every remote read first, then the sum in rank order: the ks reads of distributed shared memory
    // are in flight together (one after another they cost ~ks round trips at the end of every block).
    constexpr int MAX_KS = 16;  // the largest cluster on sm_90
    for (int i = r + ks * (int)threadIdx.x; i < count; i += ks * stride) {
        float v[MAX_KS];
#pragma unroll
        for (int q = 0; q < MAX_KS; ++q)
            if (q < ks) v[q] = cl.map_shared_rank(part, q)[i];
        float sum = 0.0f;
#pragma unroll
        for (int q = 0; q < MAX_KS; ++q)
            if (q < ks) sum += v[q];
        write(i, sum);
    }
    // No block may leave while others still read its partial sums. The reads are complete here (their
    // values are summed), so the arrive needs no release fence: a relaxed arrive spares a memory
    // barrier at the end of every block.
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}

// Launch kern<<<grid, threads, smem, st>>>(args...) with the blocks along y grouped into
// thread-block clusters of ks (the K split that cluster_reduce sums; no cluster when ks == 1).
// early: a programmatic dependent launch (sm_90) — the kernel may start while the previous one in
// the stream still runs, so it must call grid_dependency_wait() before it reads anything that
// kernel writes, and before it writes anything.
template <class... Params, class... Args>
void launch_k_split(void (*kern)(Params...), dim3 grid, int threads, size_t smem, cudaStream_t st, int ks,
                    const char* what, bool early, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[2];
    int n = 0;
    if (ks > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n].val.clusterDim.x = 1;
        attr[n].val.clusterDim.y = ks;
        attr[n].val.clusterDim.z = 1;
        ++n;
    }
    if (early) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n].val.programmaticStreamSerializationAllowed = 1;
        ++n;
    }
    cfg.attrs = n ? attr : nullptr;
    cfg.numAttrs = n;
    check(cudaLaunchKernelEx(&cfg, kern, args...), what);
    check_launch(what);
}

int device_cc_major();  // of the current device (matmul.cu)

// Whether a launch on the current device may be a programmatic dependent launch: sm_90 and up (the
// forward pass's small kernels also run on older GPUs, which have no such launch attribute; their
// griddepcontrol instructions compile to nothing there), unless EXL2BUILD_NO_PDL is set (for A/B
// timings, benchmarks/decode_ops.py).
inline bool pdl_enabled() {
    static const bool on = std::getenv("EXL2BUILD_NO_PDL") == nullptr;
    return on && device_cc_major() >= 9;
}
// kern<<<grid, threads, smem, st>>>(args...) as a programmatic dependent launch where pdl_enabled():
// a kernel that calls grid_dependency_wait() before it reads the previous kernel's output or writes
// anything.
template <class... Params, class... Args>
void launch_early(void (*kern)(Params...), dim3 grid, int threads, size_t smem, cudaStream_t st, const char* what,
                  Args... args) {
    launch_k_split(kern, grid, threads, smem, st, 1, what, pdl_enabled(), args...);
}

// f16(f16(silu(g)) * u), as torch's silu (f32, rounded to f16) then an f16 multiply: the SwiGLU
// MLP's middle, for silu_mul and for the decode-sized kernel staging it as the down projection's x.
__device__ __forceinline__ __half silu_mul_h(__half g, __half u) {
    const float gf = __half2float(g);
    return __float2half_rn(__half2float(__float2half_rn(gf / (1.0f + expf(-gf)))) * __half2float(u));
}

// Programmatic dependent launch (sm_90; no-ops elsewhere): let the next kernel in the stream start
// its prologue now, and wait until the previous kernel has finished and its writes are visible.
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace exl2cuda
