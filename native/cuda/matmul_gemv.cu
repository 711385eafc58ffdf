// Tensor-core EXL2 matmul for decode-sized M (1..32): y[M, N] = x[M, K] @ W, f16 in and out.
//
// At small M the product reads every weight once and does almost no math per byte, so the
// kernel is a memory stream: what matters is how many bytes are in flight and how little
// happens before the first load. Compared with matmul_tc.cu (which serves M up to 32):
//  * The per-unit bookkeeping comes from tables built once per linear on the host (unit_meta:
//    word row, bit width, rows, group, scale_max per 32-row unit; unit_perm: the input
//    channel of each K slot of each unit, in the mma's slot order, and log2 of its pair factor).
//    No group-table scan, no binary searches: a block's first weight loads go out after one
//    round trip.
//  * Each warp owns 64 output columns and streams its units through a ring of GV_STAGES
//    shared-memory stages with cp.async, so up to GV_STAGES - 1 units per warp are in flight
//    without holding registers; the warps of a block share one K range and one staged x (with
//    kw > 1, the block's warps also split that range: kw warps per column tile).
//  * Many small blocks: K is split over a thread-block cluster (up to 16 blocks: a power of two,
//    or 12 with kw = 2) and the partial sums are reduced through shared and distributed shared
//    memory in a fixed order, so the result does not depend on timing (no atomics).
//  * Programmatic dependent launch: the kernel lets the next one start at once and issues its
//    first weight copies before waiting for the previous kernel, so in a chain of linears (q, k,
//    v; gate, up) each one's first round trips overlap the previous one's tail.
//  * Decoding and the mma are those of tc_decode.cuh (f32 accumulation, per-group fp16 scales),
//    except that codes enter the mma as 1024 + F * q without the subtraction (pair_factor: F is
//    a power of two that spares a shift); x's K slots are staged divided by F, and the block
//    computes sum((1024 + F * 2^(b-1)) * x / F) once per group segment; each segment's sums start
//    from minus that value.

#include <algorithm>
#include <climits>
#include <cstdlib>

#include "common.cuh"
#include "gemv_plan.h"
#include "kernels_cuda.cuh"
#include "matmul_gemv.cuh"
#include "tc_decode.cuh"


namespace exl2cuda {

namespace {

// The weights and scales are read once per product, and a decode step streams far more of them than
// L2 holds: their lines are marked evict-first, so the per-unit tables (unit_meta, unit_perm) and
// the activations that every step reads again stay in L2 instead of going back to DRAM.
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool pred, uint64_t policy) {
    const int n = pred ? 16 : 0;  // 0: nothing read, 16 zero bytes written
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src), "r"(n),
                 "l"(policy));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#ifdef EXL2BUILD_PHASE_PROBE
// A diagnostic build's timing probe (CMake option EXL2BUILD_PHASE_PROBE; benchmarks/gemv_phases.py):
// thread 0 of each block stamps where the time of a launch goes. Per block: the global timer at
// entry and exit (ns; aligns blocks across SMs), the SM clock at entry, after the grid-dependency
// wait, after the prologue (x staged, offset sums), after its warp's unit loop and at exit (exact
// durations inside a block), and the SM's id.
__device__ unsigned long long g_gemv_phase[GV_PROBE_BLOCKS][GV_PROBE_SLOTS];
__device__ __forceinline__ void phase_stamp(int slot) {
    if (threadIdx.x != 0) return;
    const unsigned b = blockIdx.y * gridDim.x + blockIdx.x;
    if (b >= (unsigned)GV_PROBE_BLOCKS) return;
    unsigned long long v;
    if (slot == 0 || slot == 1) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
    } else {
        v = clock64();
    }
    g_gemv_phase[b][slot] = v;
    if (slot == 0) {
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        g_gemv_phase[b][7] = sm;
    }
}
#define GV_STAMP(...) phase_stamp(__VA_ARGS__)
#else
#define GV_STAMP(...) ((void)0)
#endif
#define GV_STAMP_EXIT() (GV_STAMP(6), GV_STAMP(1))  // SM clock, then global timer, at a block's exit

// unit_meta fields (int4 per unit; built by exl2build.kernels.unit_tables):
// x = first word row in q_weight, y = first permuted K row,
// z = bits | words << 4 | rows << 10 | (last unit of its group) << 16, w = group | scale_max bits << 16.
__device__ __forceinline__ int um_bits(const int4& u) { return u.z & 15; }
__device__ __forceinline__ int um_words(const int4& u) { return (u.z >> 4) & 63; }
__device__ __forceinline__ bool um_last(const int4& u) { return (u.z >> 16) & 1; }
__device__ __forceinline__ int um_group(const int4& u) { return u.w & 0xFFFF; }

// Where a lane's cp.async copies of a unit go: word rows lane / 16 + 2j, 16-byte chunk lane % 16 of
// the warp's 64 columns; lanes 0 and 1 also copy the group's 8 q_scale words (32 columns each).
// Offsets are 32-bit (the host admits q_weight and q_scale under 2 GiB): fewer address instructions.
struct LaneCopy {
    const char* w;      // q_weight at word row lane / 16, this lane's chunk
    const char* s;      // q_scale row 0 at this lane's 4 scale words (lanes 0, 1)
    unsigned row_bytes; // n_pad * 4
    unsigned row2;      // 2 * row_bytes: from one of this lane's rows to its next
    unsigned srow;      // bytes per q_scale row: n_pad / 2
    unsigned dst;       // byte offset of the chunk in a stage
    uint64_t policy;    // evict_first_policy()
    int row0;           // lane / 16
    bool ok;            // the chunk lies inside n_pad
    bool ok_s;
};

__device__ __forceinline__ LaneCopy lane_copy(const int32_t* __restrict__ qw, const int32_t* __restrict__ qs,
                                              int n_pad, int col_base, int lane) {
    LaneCopy c;
    const int col = col_base + 4 * (lane & 15), scol = col_base + 32 * (lane & 1);
    c.ok = col < n_pad;
    c.ok_s = lane < 2 && scol < n_pad;
    c.row0 = lane >> 4;
    c.row_bytes = (unsigned)n_pad * 4u;
    c.row2 = 2u * c.row_bytes;
    c.srow = (unsigned)n_pad / 2u;
    c.w = reinterpret_cast<const char*>(qw) + (size_t)c.row0 * c.row_bytes + 4u * (unsigned)(c.ok ? col : 0);
    c.s = reinterpret_cast<const char*>(qs) + 4u * (unsigned)(c.ok_s ? scol / 8 : 0);
    c.dst = 4u * (unsigned)(c.row0 * GV_ROW_WORDS + 4 * (lane & 15));
    c.policy = evict_first_policy();
    // Keep these in registers: otherwise the compiler recomputes them from the thread index in
    // every step of the unit loop (~40 instructions per unit).
    asm("" : "+l"(c.w), "+l"(c.s), "+r"(c.row_bytes), "+r"(c.row2), "+r"(c.srow), "+r"(c.dst), "+r"(c.row0));
    return c;
}

// Copy one unit (its word rows for the warp's 64 columns, and, when it ends a group or the block's
// range, the group's 8 q_scale words) into the stage at shared address `stage`: [word row]
// [GV_ROW_WORDS] words, then 8 scale words at byte sc_off. Columns past n_pad read zeros.
__device__ __forceinline__ void issue_scales(unsigned stage, const int4 um, const LaneCopy& c, unsigned sc_off) {
    if (c.ok_s) cp_async16(stage + sc_off + c.dst, c.s + (unsigned)um_group(um) * c.srow, true, c.policy);  // dst = 16 * lane
}

// Any unit (a group's short last unit has fewer word rows than its width).
__device__ __forceinline__ void issue_unit(unsigned stage, const int4 um, const LaneCopy& c, unsigned sc_off,
                                           bool scales) {
    const int words = um_words(um);
    const char* p = c.w + (unsigned)um.x * c.row_bytes;
#pragma unroll
    for (int j = 0; j < 4; ++j)  // word rows row0 + 2j (at most 8 rows)
        if (c.row0 + 2 * j < words) cp_async16(stage + c.dst + 8u * j * GV_ROW_WORDS, p + j * c.row2, c.ok, c.policy);
    if (scales) issue_scales(stage, um, c, sc_off);
}

// A full unit of width B: B word rows, the copy count known at compile time (the common case).
template <int B>
__device__ __forceinline__ void issue_full(unsigned stage, const int4 um, const LaneCopy& c, unsigned sc_off,
                                           bool scales) {
    const char* p = c.w + (unsigned)um.x * c.row_bytes;
#pragma unroll
    for (int j = 0; j < (B + 1) / 2; ++j) {
        if ((B & 1) == 0 || j < B / 2 || c.row0 == 0)  // an odd count: the last row is row 0's lanes'
            cp_async16(stage + c.dst + 8u * j * GV_ROW_WORDS, p, c.ok, c.policy);
        p += c.row2;
    }
    if (scales) issue_scales(stage, um, c, sc_off);
}

__device__ __forceinline__ uint4 lds128(unsigned a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}
__device__ __forceinline__ uint32_t lds32(unsigned a) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
    return v;
}

// Where a lane reads a staged unit of width B: its word rows j0 (and j0 + 1 when its 8 codes cross
// a word) of its two column chunks.
struct LaneRead {
    unsigned words;  // byte offset of row j0, chunk 0 in a stage
    unsigned scales; // byte offset of the lane's first q_scale word: sc_off + 4 * (gid / 2)
    uint32_t sel;    // scale_select(gid)
    bool two;
};

template <int B>
__device__ __forceinline__ LaneRead lane_read(int t, int gid, unsigned sc_off) {
    const int j0 = (8 * t * B) >> 5;
    LaneRead r{4u * (unsigned)(j0 * GV_ROW_WORDS + 4 * gid), sc_off + 4u * (unsigned)(gid >> 1), scale_select(gid),
               ((8 * t * B) & 31) + 8 * B > 32};
    // Held in registers through the unit loop (else recomputed there from the thread index).
    asm("" : "+r"(r.words), "+r"(r.scales), "+r"(r.sel));
    return r;
}

// The lane's words of the unit staged at shared address stage. A lane whose 8 codes lie in one word
// row (lr.two false: fixed per lane) never loads row j0 + 1: its st.w[1] keeps the zeros it started
// with (run_units), and no width's decoding reads those bits then (3 bits: the funnel shift brings
// them to bits 24 and up of the window, above the codes). Zeroing them per unit cost 8 instructions.
__device__ __forceinline__ void read_stage(Stage& st, unsigned stage, const LaneRead& lr) {
    const unsigned a = stage + lr.words;
    st.w[0][0] = lds128(a);
    st.w[0][1] = lds128(a + 128u);
    if (lr.two) {  // known at compile time for every width but 3
        st.w[1][0] = lds128(a + 4u * GV_ROW_WORDS);
        st.w[1][1] = lds128(a + 4u * GV_ROW_WORDS + 128u);
    }
}

// The lane's two q_scale words, staged with a group's last unit.
__device__ __forceinline__ void read_scales(Stage& st, unsigned stage, const LaneRead& lr) {
    st.sc[0] = lds32(stage + lr.scales);
    st.sc[1] = lds32(stage + lr.scales + 16u);
}

// A warp's streaming state: its ring of stages in shared memory. The stage that unit
// u + STAGES - 1 fills is the one unit u - 1 freed, so the stage in use and its predecessor are
// all the state (shared-space addresses).
struct Ring {
    unsigned base, stage_bytes, end;  // the warp's stage 0; end = base + GV_STAGES * stage_bytes
    unsigned cur, next;               // unit u's stage, unit u + STAGES - 1's
    unsigned sc_off;                  // byte offset of the q_scale words in a stage
    __device__ __forceinline__ void advance() {
        next = cur;
        cur = cur + stage_bytes == end ? base : cur + stage_bytes;
    }
};

// A group segment's sums start from minus its offset terms (the prologue's segment sums, at its
// first unit u): tokens 8 tau + 2t (e even) and 8 tau + 2t + 1 (e odd) of tile tau.
template <int NT>
__device__ __forceinline__ void start_segment(const float2* cl, int u, float (&tmp)[4][NT][4]) {
#pragma unroll
    for (int tau = 0; tau < NT; ++tau) {
        const float2 c = cl[(u * NT + tau) * 4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) tmp[i][tau][e] = (e & 1) ? -c.y : -c.x;
    }
}

// Where a lane reads its x fragments: the shared address of unit 0's (token tile 0), the stride
// from one unit's to the next (M tokens x 64 bytes), and which token tiles hold a token of this lane.
struct LaneX {
    unsigned addr, stride;
    int tiles;  // bit tau: token 8 tau + gid < M
};

// Units u.. of bit width B (stops at the first unit of another width): wait for unit u, refill the
// stage freed last step with unit u + STAGES - 1, multiply, and scale at each group's end. cl: this
// lane's sum(x) terms of unit 0 (token tile 0); a unit's are NT * 4 float2 further.
template <int B, int NT>
__device__ __forceinline__ int run_units(int u, int nu, const int4* ums, const float2* cl, Ring& ring,
                                         const LaneCopy& lc, const LaneX& lx, int t, int gid,
                                         float (&tmp)[4][NT][4], float (&acc)[4][NT][4]) {
    const LaneRead lr = lane_read<B>(t, gid, ring.sc_off);
    // This unit's x fragments: one add per unit (else the compiler recomputes the address and the
    // token test from the thread index in every step).
    unsigned xa = lx.addr + (unsigned)u * lx.stride;
    // unit_meta of units u and v = u + STAGES - 1, read one step ahead (its shared-memory latency
    // was exposed at the head of every step). Past the warp's units these reads land in the spare
    // entries after ums (GV_STAGES of them) and are not used.
    int4 um = ums[u], uv = ums[u + GV_STAGES - 1];
    // Loaded per unit where the lane has them (read_stage; x where its token tile holds a token), else
    // zeros throughout: set once here instead of in every step.
    Stage st;
    st.w[1][0] = st.w[1][1] = make_uint4(0u, 0u, 0u, 0u);
    uint4 xb[NT];  // token tile tau: tokens 8 tau .. 8 tau + 7, this lane's B fragment of token 8 tau + gid
#pragma unroll
    for (int tau = 0; tau < NT; ++tau) xb[tau] = make_uint4(0u, 0u, 0u, 0u);
    for (; u < nu; ++u) {
        if (um_bits(um) != B) break;
        const int4 um_next = ums[u + 1], uv_next = ums[u + GV_STAGES];
        cp_async_wait<GV_STAGES - 2>();
        __syncwarp();
        const int v = u + GV_STAGES - 1;
        if (v < nu) {
            const bool scales = um_last(uv);  // the units that finish a group (or the block's range)
            if (um_bits(uv) == B && um_words(uv) == B)
                issue_full<B>(ring.next, uv, lc, ring.sc_off, scales);
            else
                issue_unit(ring.next, uv, lc, ring.sc_off, scales);
        }
        cp_async_commit();
        read_stage(st, ring.cur, lr);
#pragma unroll
        for (int tau = 0; tau < NT; ++tau)
            if ((lx.tiles >> tau) & 1) xb[tau] = lds128(xa + 512u * tau);
        xa += lx.stride;
        mma_unit<B, NT, false>(st, t, xb, tmp);
        if (um_last(um)) {
            read_scales(st, ring.cur, lr);
            finish_group<NT>(st.sc, lr.sel, (unsigned short)(um.w >> 16), tmp, acc);
            // After a warp's last unit this reads the next unit's entry, at most one past the
            // block's units: cus has a spare unit of padding that nothing writes (no race with
            // the partial sums other warps may be writing), and the values are never used.
            start_segment<NT>(cl, u + 1, tmp);
        }
        ring.advance();
        um = um_next;
        uv = uv_next;
    }
    return u;
}

// One launch serves up to GV_MAX_LINEARS linears that read the same x (q, k and v; gate and up):
// the column tiles of linear l are blocks tile_end[l - 1] .. tile_end[l] - 1 along x, so each
// block belongs to one linear and the blocks of a cluster (along y) to the same one.
struct GemvLinear {
    const int32_t* qw;
    const int32_t* qs;
    const int4* umeta;
    const int32_t* uperm;
    __half* y;
    int N, n_pad, nu_max, stage_words;
    int split[GV_MAX_KS + 1];  // K split r takes units [split[r], split[r + 1]) (gemv_split)
};

struct GemvArgs {
    const __half* x;
    const __half* xu;  // null, or the product's x is silu(x) * xu (the SwiGLU MLP's down projection)
    GemvLinear lin[GV_MAX_LINEARS];
    int tile_end[GV_MAX_LINEARS];  // in blocks along x, cumulative
    int M, K, ks;
    int kw;  // warps of a block along K (1, 2 or 4): they share its column tiles and split its units
};

// Field f of linear l without indexing the parameter struct dynamically (that would copy it to
// local memory).
#define GV_PICK(l, f) ((l) == 0 ? a.lin[0].f : (l) == 1 ? a.lin[1].f : a.lin[2].f)

// NT token tiles of 8 (M <= 8 NT). More tiles hold more accumulators: fewer blocks per SM, so each
// thread may use more registers. A block's W warps are W / kw column tiles x kw parts of its units
// (kw > 1 where the linear has too few column tiles to keep the SMs busy: N = 4096 and less).
// SWIGLU: x is silu(a.x) * a.xu (its own instantiation: the activation adds ~800 instructions to the
// x staging, which every other product would carry).
template <int W, int NT, bool SWIGLU = false>
__global__ void __launch_bounds__(W * 32, 16 / W / NT) exl2_gemv_kernel(const __grid_constant__ GemvArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    GV_STAMP(0);
    GV_STAMP(2);
    const int l = (int)blockIdx.x < a.tile_end[0] ? 0 : (int)blockIdx.x < a.tile_end[1] ? 1 : 2;
    const int bx = (int)blockIdx.x - (l == 0 ? 0 : l == 1 ? a.tile_end[0] : a.tile_end[1]);
    const int32_t* qw = GV_PICK(l, qw);
    const int32_t* qs = GV_PICK(l, qs);
    const int4* umeta = GV_PICK(l, umeta);
    const int32_t* uperm = GV_PICK(l, uperm);
    __half* y = GV_PICK(l, y);
    const int N = GV_PICK(l, N), n_pad = GV_PICK(l, n_pad), nu_max = GV_PICK(l, nu_max);
    const int stage_words = GV_PICK(l, stage_words);
    const int rank = blockIdx.y;
    // The host's K split (a __grid_constant__ parameter: indexed in place, no local copy).
    const int ub = l == 0 ? a.lin[0].split[rank] : l == 1 ? a.lin[1].split[rank] : a.lin[2].split[rank];
    const int ue = l == 0 ? a.lin[0].split[rank + 1] : l == 1 ? a.lin[1].split[rank + 1] : a.lin[2].split[rank + 1];
    const int nu = ue - ub;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t = lane & 3;
    // kw is 1, 2 or 4: shifts, not integer divisions (~20 instructions each, some per staged unit)
    const int lkw = a.kw >> 1, wc = W >> lkw, wcol = warp & (wc - 1), wk = warp >> (31 - __clz(wc));
    const int col_base = (bx * wc + wcol) * GV_COLS;
    const int w0 = (nu * wk) >> lkw, w1 = (nu * (wk + 1)) >> lkw;  // this warp's units [w0, w1)
    const bool active = col_base < n_pad;  // idle warps still stage x and join the barriers
    const int sc_off = stage_words - 8;

    // Shared memory (same offsets in every block of a cluster): stages, x, unit_meta, partial sums.
    uint32_t* stages = reinterpret_cast<uint32_t*>(smem_raw) + (size_t)warp * GV_STAGES * stage_words;
    const unsigned stages_s = (unsigned)__cvta_generic_to_shared(stages);
    __half* xs = reinterpret_cast<__half*>(smem_raw + (size_t)W * GV_STAGES * stage_words * 4);
    int4* ums = reinterpret_cast<int4*>(xs + (size_t)nu_max * a.M * 32);  // nu_max + GV_STAGES (spares)
    // [unit][8 NT]: the offset terms' share of each unit's sums, then of each group segment's (at its first unit)
    float* cus = reinterpret_cast<float*>(ums + nu_max + GV_STAGES);

    // 1. The first K-slot channels of x, then (one round trip for unit_meta) this warp's first units.
    constexpr int CH = 8;
    const int nthr = W * 32, total = nu * 32;
    const int32_t* up = uperm + (int64_t)ub * 32;
    // unit_perm entries: slot i's channel | log2(F) << 24, F its pair factor (x is staged as x / F;
    // 1 / F as fp16 is exact); -1 past a short unit's rows.
    int src[CH];
    auto load_src = [&](int base) {
#pragma unroll
        for (int q = 0; q < CH; ++q) {
            const int i = base + q * nthr + (int)threadIdx.x;
            src[q] = i < total ? __ldg(up + i) : -1;
        }
    };
    auto store_x = [&](int base) {
        for (int m = 0; m < a.M; ++m) {
            __half v[CH];
#pragma unroll
            for (int q = 0; q < CH; ++q) {
                const int64_t i = (int64_t)m * a.K + (src[q] & 0xFFFFFF);
                v[q] = src[q] < 0 ? __float2half(0.0f) : SWIGLU ? silu_mul_h(a.x[i], a.xu[i]) : a.x[i];
            }
#pragma unroll
            for (int q = 0; q < CH; ++q) {
                const int i = base + q * nthr + (int)threadIdx.x;
                const __half inv = __ushort_as_half((unsigned short)(0x3C00u - ((unsigned)src[q] >> 24 & 7u) * 0x400u));
                if (i < total) xs[((i >> 5) * a.M + m) * 32 + (i & 31)] = __hmul(v[q], inv);
            }
        }
    };
    // Programmatic dependent launch: the weights and tables are constants, so their first loads go
    // out while the previous kernel still runs; x (its output, perhaps) is read after the wait.
    grid_dependents_launch();
    load_src(0);
    const int4 um_lane = lane < w1 - w0 ? __ldg(umeta + ub + w0 + lane) : make_int4(0, 0, 0, 0);
    const LaneCopy lc = lane_copy(qw, qs, n_pad, col_base, lane);
    for (int s = 0; s < GV_STAGES - 1; ++s) {
        int4 um;
        um.x = __shfl_sync(0xffffffffu, um_lane.x, s);
        um.y = __shfl_sync(0xffffffffu, um_lane.y, s);
        um.z = __shfl_sync(0xffffffffu, um_lane.z, s);
        um.w = __shfl_sync(0xffffffffu, um_lane.w, s);
        if (active && s < w1 - w0)
            issue_unit(stages_s + 4u * (unsigned)(s * stage_words), um, lc, 4u * sc_off, um_last(um) || w0 + s + 1 == w1);
        cp_async_commit();
    }
    // The block's unit_meta into shared memory (constants too, so before the wait). Each warp's last
    // unit ends its group here: its sums are scaled and its scales staged.
    for (int i = threadIdx.x; i < nu; i += nthr) {
        int4 m = __ldg(umeta + ub + i);
        for (int k = 1; k <= a.kw; ++k)
            if (i == ((nu * k) >> lkw) - 1) m.z |= 1 << 16;
        ums[i] = m;
    }
    grid_dependency_wait();
    GV_STAMP(3);
    store_x(0);
    for (int base = CH * nthr; base < total; base += CH * nthr) {
        load_src(base);
        store_x(base);
    }
    __syncthreads();
    // The codes enter the mma as 1024 + F * q (one LOP3 per two weights, no subtraction), so each
    // group's sums carry sum((1024 + F * 2^(b-1)) * x / F) too, x / F as staged; per unit and
    // token, in f32, in a fixed order. Half2 k of a token's 32 slots belongs to pair k % 4.
    // Entries of tokens past M (the mma's padding) are zeros; only the M real tokens are summed
    // (a loop over all 8 NT entries per unit would run the sum in every warp at M = 1).
    for (int j = threadIdx.x; j < nu * 8 * NT; j += nthr)
        if (j % (8 * NT) >= a.M) cus[j] = 0.0f;
    for (int j = threadIdx.x; j < nu * a.M; j += nthr) {
        const int lu = j / a.M, m = j - lu * a.M;
        const __half2* p = reinterpret_cast<const __half2*>(xs + j * 32);
        float pr[4][2] = {};  // [pair][half]: a pair's two halves may have different factors
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const float2 f = __half22float2(p[k]);
            pr[k & 3][0] += f.x;
            pr[k & 3][1] += f.y;
        }
        const int bits = um_bits(ums[lu]);
        float sum = 0.0f;
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) sum += (float)(1024u + (pair_factor_of(bits, r, h) << (bits - 1))) * pr[r][h];
        cus[lu * 8 * NT + m] = sum;
    }
    __syncthreads();
    // Then per group segment (a group's units inside this block's range): the sum over its units,
    // kept at its first unit, where the unit loop starts the segment's sums from minus this value.
    for (int j = threadIdx.x; j < nu * a.M; j += nthr) {
        const int lu = j / a.M, m = j - lu * a.M;
        if (lu > 0 && !um_last(ums[lu - 1])) continue;
        float sum = cus[lu * 8 * NT + m];
        for (int w = lu; !um_last(ums[w]);) sum += cus[(++w) * 8 * NT + m];
        cus[lu * 8 * NT + m] = sum;
    }
    __syncthreads();
    GV_STAMP(4);

    // 2. Stream the units, one run of equal bit width at a time (the width is a template argument
    // inside a run, so the decoding is straight-line code).
    float acc[4][NT][4], tmp[4][NT][4];
    zero_tiles(acc);
    if (active) {
        LaneX lx{(unsigned)__cvta_generic_to_shared(xs) + 16u * (unsigned)(gid * 4 + t), 64u * (unsigned)a.M, 0};
#pragma unroll
        for (int tau = 0; tau < NT; ++tau) lx.tiles |= (8 * tau + gid < a.M) << tau;
        asm("" : "+r"(lx.addr), "+r"(lx.stride), "+r"(lx.tiles));
        const unsigned sb = 4u * (unsigned)stage_words;
        Ring ring{stages_s, sb, stages_s + GV_STAGES * sb, stages_s, stages_s + (GV_STAGES - 1) * sb, 4u * (unsigned)sc_off};
        const float2* cl = reinterpret_cast<const float2*>(cus) + t;
        start_segment<NT>(cl, w0, tmp);
        int u = w0;
        while (u < w1) {
            switch (um_bits(ums[u])) {
                case 2: u = run_units<2, NT>(u, w1, ums, cl, ring, lc, lx, t, gid, tmp, acc); break;
                case 3: u = run_units<3, NT>(u, w1, ums, cl, ring, lc, lx, t, gid, tmp, acc); break;
                case 4: u = run_units<4, NT>(u, w1, ums, cl, ring, lc, lx, t, gid, tmp, acc); break;
                case 5: u = run_units<5, NT>(u, w1, ums, cl, ring, lc, lx, t, gid, tmp, acc); break;
                case 6: u = run_units<6, NT>(u, w1, ums, cl, ring, lc, lx, t, gid, tmp, acc); break;
                case 8: u = run_units<8, NT>(u, w1, ums, cl, ring, lc, lx, t, gid, tmp, acc); break;
                default: u = w1; break;  // unreachable: kernels.py admits only these widths
            }
        }
        cp_async_wait<0>();
    }
    GV_STAMP(5);

    // 3. Output (each_lane_out: the token and column of each of the lane's sums).
    if (a.ks == 1 && a.kw == 1) {
        if (!active) {
            GV_STAMP_EXIT();
            return;
        }
        // The same walk as each_lane_out, written out: through it the compiler schedules these
        // stores differently, and that version has not been timed.
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int tau = 0; tau < NT; ++tau)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int m = 8 * tau + 2 * t + (e & 1), k = 2 * i + (e >> 1);
                    const int n = col_base + (k < 4 ? 0 : 32) + 4 * gid + (k & 3);
                    if (m < a.M && n < N) y[(int64_t)m * N + n] = __float2half_rn(acc[i][tau][e]);
                }
        GV_STAMP_EXIT();
        return;
    }
    // Partial sums [kw][M][wc * 64]; the kw parts are added in order, then (ks > 1) across the
    // cluster, in a fixed order either way.
    float* part = cus + (size_t)(nu_max + 1) * 8 * NT;  // past cus and its spare unit
    const int NO = a.M * wc * GV_COLS;
    each_lane_out(acc, t, gid, a.M, [&](int m, int c, float v) { part[wk * NO + m * wc * GV_COLS + wcol * GV_COLS + c] = v; });
    auto write_y = [&](int i, float sum) {
        const int m = i / (wc * GV_COLS), n = bx * wc * GV_COLS + i % (wc * GV_COLS);
        if (n < N) y[(int64_t)m * N + n] = __float2half_rn(sum);
    };
    if (a.kw > 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < NO; i += nthr) {
            float sum = part[i];
            for (int k = 1; k < a.kw; ++k) sum += part[k * NO + i];
            if (a.ks == 1)
                write_y(i, sum);
            else
                part[i] = sum;
        }
        if (a.ks == 1) {
            GV_STAMP_EXIT();
            return;
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cluster_reduce(part, NO, a.ks, nthr, write_y);
#endif
    GV_STAMP_EXIT();
}

template <int W, int NT, bool SWIGLU = false>
void launch_gemv(const GemvArgs& a, unsigned gx, size_t smem, cudaStream_t st) {
    auto kern = exl2_gemv_kernel<W, NT, SWIGLU>;
    if (smem > 48 * 1024)
        check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "exl2_matmul");
    if (a.ks > 8) check(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1), "exl2_matmul");
    launch_k_split(kern, dim3(gx, (unsigned)a.ks, 1), W * 32, smem, st, a.ks, "exl2_matmul", pdl_enabled(), a);
}

// gemv_split's fixed part per unit, in bits (GemvShape::cost_c) for linears of several widths;
// EXL2BUILD_GEMV_COST_C overrides it for A/B timings (a negative value: equal unit counts).
int gemv_cost_c() {
    static const int c = [] {
        const char* e = std::getenv("EXL2BUILD_GEMV_COST_C");
        return e ? std::atoi(e) : GV_COST_C;
    }();
    return c;
}

}  // namespace

#ifdef EXL2BUILD_PHASE_PROBE
void gemv_phase_copy(void* dst, bool clear, uintptr_t stream) {
    const cudaStream_t st = as_stream(stream);
    check(cudaMemcpyFromSymbolAsync(dst, g_gemv_phase, sizeof(g_gemv_phase), 0, cudaMemcpyDeviceToDevice, st),
          "gemv_phase_copy");
    if (clear) {
        void* p = nullptr;
        check(cudaGetSymbolAddress(&p, g_gemv_phase), "gemv_phase_copy");
        check(cudaMemsetAsync(p, 0, sizeof(g_gemv_phase), st), "gemv_phase_copy");
    }
}
#endif

bool exl2_matmul_gemv_group(const void* x, const GemvLinearDesc* lins, int count, int64_t M, int64_t K,
                            uintptr_t stream, int sms, int cc_major, int smem_optin, int warps, int k_splits,
                            int k_warps, const void* x_up) {
    if (cc_major < 9 || count < 1 || count > GV_MAX_LINEARS) return false;
    // The SwiGLU staging is built for decode (one linear, up to 8 tokens, 4 warps); elsewhere the
    // caller runs silu_mul first.
    if (x_up && (count != 1 || M > 8 || warps == 2)) return false;
    GemvShape shapes[GV_MAX_LINEARS];
    for (int l = 0; l < count; ++l) {
        const GemvLinearDesc& d = lins[l];
        if (reinterpret_cast<uintptr_t>(d.q_weight) % 16 || reinterpret_cast<uintptr_t>(d.q_scale) % 16 ||
            reinterpret_cast<uintptr_t>(d.unit_meta) % 16)
            return false;
        shapes[l] = {d.n_pad, d.U, d.max_bits, d.unit_bits, d.unit_bits ? gemv_cost_c() : -1};
    }
    const GemvPlan plan = gemv_plan(shapes, count, M, {sms, smem_optin, device_smem_per_sm(), device_smem_reserved()},
                                    warps, k_splits, k_warps);
    if (!plan.ok) return false;
    const int W = plan.W, ks = plan.ks, kw = plan.kw;
    const size_t smem = plan.smem;
    GemvArgs a = {};
    a.x = reinterpret_cast<const __half*>(x);
    a.xu = reinterpret_cast<const __half*>(x_up);
    a.M = (int)M;
    a.K = (int)K;
    a.ks = ks;
    a.kw = kw;
    int blocks = 0;
    for (int l = 0; l < GV_MAX_LINEARS; ++l) {
        if (l < count) {
            const GemvLinearDesc& d = lins[l];
            GemvLinear& g = a.lin[l];
            g.qw = d.q_weight;
            g.qs = d.q_scale;
            g.umeta = reinterpret_cast<const int4*>(d.unit_meta);
            g.uperm = d.unit_perm;
            g.y = reinterpret_cast<__half*>(d.y);
            g.N = (int)d.N;
            g.n_pad = (int)d.n_pad;
            g.nu_max = (int)gemv_split(shapes[l], ks, g.split);
            g.stage_words = d.max_bits * GV_ROW_WORDS + 8;
            blocks += (int)gemv_col_blocks(d.n_pad, W / kw);
        }
        a.tile_end[l] = blocks;
    }
    const unsigned gx = (unsigned)blocks;
    const cudaStream_t st = as_stream(stream);
    if (x_up)
        launch_gemv<4, 1, true>(a, gx, smem, st);
    else if (M <= 8)
        W == 2 ? launch_gemv<2, 1>(a, gx, smem, st) : launch_gemv<4, 1>(a, gx, smem, st);
    else if (M <= 16)
        W == 2 ? launch_gemv<2, 2>(a, gx, smem, st) : launch_gemv<4, 2>(a, gx, smem, st);
    else
        W == 2 ? launch_gemv<2, 4>(a, gx, smem, st) : launch_gemv<4, 4>(a, gx, smem, st);
    return true;
}

bool exl2_matmul_gemv(const void* x, const int32_t* q_weight, const int32_t* q_scale, const int32_t* unit_meta,
                      const int32_t* unit_perm, void* y, int64_t M, int64_t K, int64_t N, int64_t n_pad, int64_t U,
                      int max_bits, const uint8_t* unit_bits, uintptr_t stream, int sms, int cc_major,
                      int smem_optin, int warps, int k_splits, int k_warps) {
    const GemvLinearDesc d{q_weight, q_scale, unit_meta, unit_perm, y, N, n_pad, U, max_bits, unit_bits};
    return exl2_matmul_gemv_group(x, &d, 1, M, K, stream, sms, cc_major, smem_optin, warps, k_splits, k_warps);
}

}  // namespace exl2cuda
