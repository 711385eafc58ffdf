// Tensor-core EXL2 matmul for f16 activations and small M (decode, short prompts), and an fp16
// dequantizer (the large-M path: dequantize, then torch.matmul) built on the same decoding.
//
// y[M, N] = x[M, K] @ W with W stored as EXL2 (codes packed along the permuted K, groups of
// bit widths 2..8). The weights are the A operand of mma.sync m16n8k16 (16 output columns x
// 16 K rows) and x the B operand (16 K rows x 8 tokens), so one instruction multiplies 256
// weights by up to 8 tokens and the decoding of codes dominates the instruction count.
//
// Layout of the work:
//  * A block owns 64 output columns; its 8 warps split the block's K range by 32-row units;
//    K is split again over a thread-block cluster (sm_90) and reduced through distributed
//    shared memory, so the reduction order (and the result) is fixed.
//  * Lane (gid = lane / 4, t = lane % 4) reads, for every unit, the words of its 8 columns
//    (base + 4*gid + 0..3 and base + 32 + 4*gid + 0..3: two 16-byte loads per word row, each
//    load instruction of the warp covering 128 contiguous bytes) that hold rows 8t..8t+7 of
//    the unit: at most two word rows for any bit width.
//  * The mma's K slots are a free permutation of the unit's rows, so each lane's 8 codes feed
//    its own K slots: pair r (0..3) = rows (8t + r, 8t + r + 4) of a column; step 0 of the unit
//    takes pairs 0 and 1, step 1 pairs 2 and 3. x is staged in shared memory in exactly that
//    order ([unit][token][t][pair] half2), so a lane's B fragment is one 16-byte load.
//  * Codes become fp16 by OR-ing them into the mantissa of 1024 (0x6400) and subtracting
//    1024 + 2^(b-1): the A operand is the exact integer q - 2^(b-1). Accumulation is f32; the
//    per-group, per-column fp16 scale multiplies the group's partial sum.
//  * Each warp keeps STAGES units of weight loads in flight across group boundaries (a unit's
//    loads have the same shape for every bit width); the first ones are issued before x is staged.

#include <algorithm>

#include "common.cuh"
#include "matmul_tc.cuh"
#include "tc_decode.cuh"


namespace exl2cuda {

namespace {

constexpr int TC_WARPS = 8;
constexpr int TC_THREADS = TC_WARPS * 32;
constexpr int TC_COLS = 64;
constexpr int TC_STAGES = 3;

__host__ __device__ inline int64_t align4i(int64_t v) { return (v + 3) / 4 * 4; }


// Issue one unit's loads for lane t's columns col0 + 0..3 and col1 + 0..3: the unit starts at
// word row `row` of q_weight, has `words` word rows of width b and belongs to group g.
__device__ __forceinline__ void load_words(Stage& st, const int32_t* __restrict__ qw, const int32_t* __restrict__ qs,
                                           int n_pad, int64_t row, int b, int words, int g, int t, int col0, int col1,
                                           bool v0, bool v1) {
    const int j0 = (8 * t * b) >> 5;
    const bool two = ((8 * t * b) & 31) + 8 * b > 32;
    const int32_t* p = qw + (row + j0) * n_pad;
    st.w[0][0] = ldg4(p + col0, v0 && j0 < words);
    st.w[0][1] = ldg4(p + col1, v1 && j0 < words);
    st.w[1][0] = ldg4(p + n_pad + col0, v0 && two && j0 + 1 < words);
    st.w[1][1] = ldg4(p + n_pad + col1, v1 && two && j0 + 1 < words);
    const int32_t* s = qs + (int64_t)g * (n_pad / 8);
    st.sc[0] = v0 ? (uint32_t)__ldg(s + (col0 >> 3)) : 0u;
    st.sc[1] = v1 ? (uint32_t)__ldg(s + (col1 >> 3)) : 0u;
}

// What a warp needs to know about one 32-row unit, built once per block in shared memory so the
// main loop spends one 16-byte shared load per unit on bookkeeping:
// x = first word row of the unit in q_weight, y = first permuted K row,
// z = bits | words << 4 | rows << 10 | (last unit of its group) << 16, w = group | q_scale_max bits << 16.
__device__ __forceinline__ int4 unit_meta(const GroupTable& gt, const __half* __restrict__ qsm, int G, int u) {
    const int g = find_le(gt.unit, G, u);
    const int b = gt.bits[g], lu = u - gt.unit[g];
    const int rows = min(32, gt.row[g + 1] - gt.row[g] - lu * 32);
    const int words = (rows * b + 31) >> 5;  // a group's short last unit stops at its last word
    const int last = (u + 1 == gt.unit[g + 1]) ? 1 : 0;
    return make_int4(gt.qrow[g] + lu * b, gt.row[g] + lu * 32, b | (words << 4) | (rows << 10) | (last << 16),
                     g | ((int)__half_as_ushort(qsm[g]) << 16));
}

__device__ __forceinline__ void load_unit_meta(Stage& st, const int4 um, const int32_t* __restrict__ qw,
                                               const int32_t* __restrict__ qs, int n_pad, int t, int col0, int col1,
                                               bool v0, bool v1) {
    load_words(st, qw, qs, n_pad, um.x, um.z & 15, (um.z >> 4) & 63, um.w & 0xFFFF, t, col0, col1, v0, v1);
}

template <int MT>
__global__ void __launch_bounds__(TC_THREADS, MT <= 8 ? 2 : 1) exl2_matmul_tc_kernel(
    const __half* __restrict__ x, const int32_t* __restrict__ qw, const int32_t* __restrict__ qs,
    const __half* __restrict__ qsm, const int16_t* __restrict__ qg, const int32_t* __restrict__ perm,
    __half* __restrict__ y, int M, int K, int N, int n_pad, int G, int ks, int x_in_smem) {
    constexpr int NT = (MT + 7) / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int* tbl = reinterpret_cast<int*>(smem_raw);
    const GroupTable gt = build_group_table(qg, G, K, tbl);

    const int U = gt.unit[G];
    const int rank = blockIdx.y;
    // 32-bit (U * ks < 2^31: U is at most K / 32 + G): a 64-bit division is a ~100-instruction call.
    const int ub = (int)((unsigned)U * (unsigned)rank / (unsigned)ks);
    const int ue = (int)((unsigned)U * (unsigned)(rank + 1) / (unsigned)ks);
    const int nu = ue - ub;
    int4* umeta = reinterpret_cast<int4*>(tbl + align4i(group_table_ints(G)));
    // Same offsets in every block of a cluster (the reduction maps `part` into the other blocks'
    // shared memory by this block's address), so room for the largest rank's units: ceil(U / ks).
    __half* xs = reinterpret_cast<__half*>(umeta + (U + ks - 1) / ks);
    const int m0 = blockIdx.z * MT;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t = lane & 3;
    const int wu0 = ub + (int)((int64_t)nu * warp / TC_WARPS);
    const int wu1 = ub + (int)((int64_t)nu * (warp + 1) / TC_WARPS);
    const int base = blockIdx.x * TC_COLS;
    const int col0 = base + 4 * gid, col1 = base + 32 + 4 * gid;
    const bool v0 = col0 < n_pad, v1 = col1 < n_pad;

    for (int lu = threadIdx.x; lu < nu; lu += TC_THREADS) umeta[lu] = unit_meta(gt, qsm, G, ub + lu);
    // Small M: copy the block's x rows whole into shared memory with coalesced loads, so the
    // permuted gather below reads shared memory; gathering from global memory instead costs one
    // 32-byte L2 sector per 2-byte element, as much L2 traffic as the weights at M = 1.
    // Layout after the reduction buffers: [tbl][umeta][xs / red][part][x rows].
    const __half* xsrc;
    if (x_in_smem) {
        __half* xrows = reinterpret_cast<__half*>(reinterpret_cast<unsigned char*>(smem_raw) + (size_t)x_in_smem);
        const int rows_m = min(MT, M - m0);
        if ((K & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
            const int per = K >> 3;
            for (int i = threadIdx.x; i < rows_m * per; i += TC_THREADS) {
                const int m = i / per, k8 = i - m * per;
                reinterpret_cast<uint4*>(xrows)[(int64_t)m * per + k8] =
                    __ldg(reinterpret_cast<const uint4*>(x + (int64_t)(m0 + m) * K) + k8);
            }
        } else {
            for (int i = threadIdx.x; i < rows_m * K; i += TC_THREADS)
                xrows[i] = __ldg(x + (int64_t)m0 * K + i);
        }
        xsrc = xrows;
    } else {
        xsrc = x + (int64_t)m0 * K;
    }
    __syncthreads();

    Stage st[TC_STAGES];
#pragma unroll
    for (int s = 0; s < TC_STAGES; ++s)
        if (wu0 + s < wu1) load_unit_meta(st[s], umeta[wu0 + s - ub], qw, qs, n_pad, t, col0, col1, v0, v1);

    // Stage x[m0 + m, perm[row]] as fp16 in fragment order: xs[(lu * MT + m) * 4 + t][pair r][lo/hi],
    // row = unit row 8t + r + 4*hi; rows past the group's end are 0 (their codes meet a zero x).
    // All perm loads of a chunk are issued before its x loads: two round trips per chunk, and one
    // chunk covers the block's rows for M = 1 (this prologue is on the critical path of a decode).
    {
        constexpr int CH = MT >= 16 ? 1 : 16 / MT;  // rows per thread per chunk
        const int total = nu * 32;
        for (int c0 = 0; c0 < total; c0 += CH * TC_THREADS) {
            int src[CH], dst[CH];
#pragma unroll
            for (int q = 0; q < CH; ++q) {
                const int idx = c0 + q * TC_THREADS + (int)threadIdx.x;
                src[q] = -1;
                dst[q] = -1;
                if (idx < total) {
                    const int lu = idx >> 5, i = idx & 31;
                    const int4 um = umeta[lu];
                    if (i < ((um.z >> 10) & 63)) src[q] = __ldg(perm + um.y + i);
                    dst[q] = ((lu * MT) * 4 + (i >> 3)) * 8 + (i & 3) * 2 + ((i >> 2) & 1);
                }
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                __half v[CH];
#pragma unroll
                for (int q = 0; q < CH; ++q)
                    v[q] = (src[q] >= 0 && m0 + m < M) ? xsrc[(int64_t)m * K + src[q]] : __float2half(0.0f);
#pragma unroll
                for (int q = 0; q < CH; ++q)
                    if (dst[q] >= 0) xs[dst[q] + m * 32] = v[q];
            }
        }
    }
    __syncthreads();

    float acc[4][NT][4], tmp[4][NT][4];
    zero_tiles(acc);
    zero_tiles(tmp);

    const uint4* xs4 = reinterpret_cast<const uint4*>(xs);
    for (int u = wu0; u < wu1; u += TC_STAGES) {
#pragma unroll
        for (int s = 0; s < TC_STAGES; ++s) {
            const int uu = u + s;
            if (uu < wu1) {
                const int4 um = umeta[uu - ub];
                uint4 xb[NT];
#pragma unroll
                for (int tau = 0; tau < NT; ++tau) {
                    const int m = 8 * tau + gid;
                    xb[tau] = (m < MT) ? xs4[((int64_t)(uu - ub) * MT + m) * 4 + t] : make_uint4(0u, 0u, 0u, 0u);
                }
                switch (um.z & 15) {
                    case 2: mma_unit<2, NT>(st[s], t, xb, tmp); break;
                    case 3: mma_unit<3, NT>(st[s], t, xb, tmp); break;
                    case 4: mma_unit<4, NT>(st[s], t, xb, tmp); break;
                    case 5: mma_unit<5, NT>(st[s], t, xb, tmp); break;
                    case 6: mma_unit<6, NT>(st[s], t, xb, tmp); break;
                    case 8: mma_unit<8, NT>(st[s], t, xb, tmp); break;
                    default: break;
                }
                if (((um.z >> 16) & 1) || uu + 1 == wu1)
                    finish_group<NT>(st[s].sc, scale_select(gid), (unsigned short)(um.w >> 16), tmp, acc);
                const int nx = uu + TC_STAGES;
                if (nx < wu1) load_unit_meta(st[s], umeta[nx - ub], qw, qs, n_pad, t, col0, col1, v0, v1);
            }
        }
    }

    // Reduce the warps' sums (shared memory), then the cluster's blocks (distributed shared memory).
    __syncthreads();
    float* red = reinterpret_cast<float*>(xs);  // [warp][MT][64]
    constexpr int NO = MT * TC_COLS;
    each_lane_out(acc, t, gid, MT, [&](int m, int c, float v) { red[(warp * MT + m) * TC_COLS + c] = v; });
    __syncthreads();
    float* part = red + TC_WARPS * NO;
    for (int i = threadIdx.x; i < NO; i += TC_THREADS) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < TC_WARPS; ++w) v += red[w * NO + i];
        part[i] = v;
    }
    auto write_out = [&](int i, float v) {
        const int m = i / TC_COLS, nn = base + i % TC_COLS, mm = m0 + m;
        if (mm < M && nn < N) y[(int64_t)mm * N + nn] = __float2half_rn(v);
    };
    if (ks == 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < NO; i += TC_THREADS) write_out(i, part[i]);
    } else {
        cluster_reduce(part, NO, ks, TC_THREADS, write_out);
    }
}


// Dequantization to fp16 W^T [K, N] (original row order) with the same unit decoding, driven by
// the unit tables the decode-sized kernel uses (kernels.unit_tables: no group table per block).
// Block (x, u): unit u for DQ_WARPS adjacent 64-column tiles, one per warp, so each of the unit's
// 32 output rows perm[r] gets DQ_WARPS * 128 contiguous bytes from one block (the rows are
// scattered by perm; short runs per row left the writes at ~55 % of copy bandwidth). Neighbour
// lanes swap halves so that every lane stores 16 bytes: 8 adjacent columns of one row.
constexpr int DQ_WARPS = 8;

template <int B>
__device__ __forceinline__ void decode_unit(const Stage& st, int t, uint32_t (&P)[8][4]) {
    const int sh = (8 * t * B) & 31;
#pragma unroll
    for (int k = 0; k < 8; ++k) lane_pairs<B>(st, k, sh, P[k]);
}

__global__ void __launch_bounds__(DQ_WARPS * 32) dequant_units_kernel(
    const int32_t* __restrict__ qw, const int32_t* __restrict__ qs, const int4* __restrict__ umeta,
    const int32_t* __restrict__ uperm, __half* __restrict__ out, int N, int n_pad) {
    const int u = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t = lane & 3;
    const int base = (blockIdx.x * DQ_WARPS + warp) * TC_COLS;
    if (base >= n_pad) return;  // no barriers below
    const int4 um = __ldg(umeta + u);
    const int col0 = base + 4 * gid, col1 = base + 32 + 4 * gid;
    Stage st;
    load_unit_meta(st, um, qw, qs, n_pad, t, col0, col1, col0 < n_pad, col1 < n_pad);
    // The lane's rows 8t + r + 4hh sit at K slots 8t + 2r + hh of unit_perm (channel in bits 0-23;
    // -1: past a short unit).
    const int4 pa = __ldg(reinterpret_cast<const int4*>(uperm + (int64_t)u * 32 + 8 * t));
    const int4 pb = __ldg(reinterpret_cast<const int4*>(uperm + (int64_t)u * 32 + 8 * t + 4));
    const int slot[8] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
    uint32_t P[8][4];
    switch (um.z & 15) {
        case 2: decode_unit<2>(st, t, P); break;
        case 3: decode_unit<3>(st, t, P); break;
        case 4: decode_unit<4>(st, t, P); break;
        case 5: decode_unit<5>(st, t, P); break;
        case 6: decode_unit<6>(st, t, P); break;
        case 8: decode_unit<8>(st, t, P); break;
        default: break;
    }
    const __half smax = __ushort_as_half((unsigned short)((unsigned)um.w >> 16));
    float sc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) sc[k] = lane_scale(st, gid, k, smax);
    const bool odd = gid & 1;
    // Even lanes store columns 4 gid .. 4 gid + 7 of the first 32, odd lanes 32 + 4 (gid - 1) .. + 7.
    const int scol = odd ? col1 - 4 : col0;
    const bool vec = (N & 7) == 0 && scol + 7 < N;
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // row 8t + r + 4hh, q = r + 4hh
        const int r = q & 3, hh = q >> 2;
        uint32_t w[2][2];  // [chunk][column pair]: the f16 values of columns 4 gid + 0..3 of each chunk
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                __half h[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const __half2 pr = *reinterpret_cast<const __half2*>(&P[4 * c + 2 * j + e][r]);
                    const float v = __half2float(hh ? __high2half(pr) : __low2half(pr));
                    h[e] = __float2half_rn(v * sc[4 * c + 2 * j + e]);  // as the reference: f32 product, one rounding
                }
                w[c][j] = (uint32_t)__half_as_ushort(h[0]) | ((uint32_t)__half_as_ushort(h[1]) << 16);
            }
        // Swap with lane ^ 4 (gid ^ 1): even lanes give their second chunk, odd lanes their first.
        const uint32_t s0 = __shfl_xor_sync(0xffffffffu, odd ? w[0][0] : w[1][0], 4);
        const uint32_t s1 = __shfl_xor_sync(0xffffffffu, odd ? w[0][1] : w[1][1], 4);
        const int orow = slot[2 * r + hh] & 0xFFFFFF;  // bits 24-26: the gemv's pair factor
        if (slot[2 * r + hh] < 0) continue;
        const uint4 o = odd ? make_uint4(s0, s1, w[1][0], w[1][1]) : make_uint4(w[0][0], w[0][1], s0, s1);
        __half* dst = out + (int64_t)orow * N + scol;
        if (vec) {
            *reinterpret_cast<uint4*>(dst) = o;
        } else {
            const uint32_t ow[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (scol + j < N) dst[j] = __ushort_as_half((unsigned short)(ow[j >> 1] >> (16 * (j & 1))));
        }
    }
}

template <int MT>
void launch_tc(const __half* x, const int32_t* qw, const int32_t* qs, const __half* qsm, const int16_t* qg,
               const int32_t* perm, __half* y, int M, int K, int N, int n_pad, int G, int ks, int ztiles,
               size_t smem, int x_in_smem, cudaStream_t st) {
    auto kern = exl2_matmul_tc_kernel<MT>;
    if (smem > 48 * 1024)
        check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "exl2_matmul");
    launch_k_split(kern, dim3((unsigned)cdiv(n_pad, TC_COLS), (unsigned)ks, (unsigned)ztiles), TC_THREADS, smem, st, ks,
                   "exl2_matmul", false, x, qw, qs, qsm, qg, perm, y, M, K, N, n_pad, G, ks, x_in_smem);
}

}  // namespace

bool exl2_matmul_tc(const void* x, const int32_t* q_weight, const int32_t* q_scale, const uint16_t* q_scale_max,
                    const int16_t* q_groups, const int32_t* q_perm, void* y, int64_t M, int64_t K, int64_t N,
                    int64_t n_pad, int64_t G, uintptr_t stream, int sms, int cc_major, int smem_optin, int k_splits) {
    if (cc_major < 8 || M <= 0 || M > 32 || G >= 65536) return false;
    if (reinterpret_cast<uintptr_t>(q_weight) % 16) return false;  // 16-byte weight loads
    const int MT = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16;
    const int ztiles = (int)cdiv(M, MT);
    const int64_t ntiles = cdiv(n_pad, TC_COLS);
    const int64_t u_bound = (K + 31) / 32 + G;
    const int ks_max = cc_major >= 9 ? 8 : 1;
    int ks = 1;
    if (k_splits > 0) {
        ks = std::min(k_splits, ks_max);
    } else if (ks_max > 1) {
        // About 1.5 blocks per SM (H200 sweep, benchmarks/RESULTS.md: 4096x14336 best at ks = 1,
        // 14336x4096 at 3, 4096x4096 at 2-3); at least two units per warp.
        ks = (int)std::min<int64_t>(ks_max, std::max<int64_t>(1, (3LL * sms + ntiles * ztiles) / (2 * ntiles * ztiles)));
        ks = (int)std::min<int64_t>(ks, std::max<int64_t>(1, u_bound / (2 * TC_WARPS)));
    }
    const int64_t tbl_bytes = align4i(group_table_ints(G)) * 4;
    auto smem_for = [&](int k) {
        const int64_t units = cdiv(u_bound, k);
        const int64_t xs_bytes = std::max<int64_t>(units * 32 * MT * 2, (int64_t)TC_WARPS * MT * TC_COLS * 4);
        return (size_t)(tbl_bytes + units * 16 + xs_bytes + (int64_t)MT * TC_COLS * 4);
    };
    while (smem_for(ks) > (size_t)smem_optin && ks < ks_max) ++ks;
    size_t smem = smem_for(ks);
    if (smem > (size_t)smem_optin) return false;
    // M <= 2: whole x rows in shared memory too, where two blocks still fit an SM.
    int x_in_smem = 0;
    const size_t x_bytes = (size_t)cdiv((int64_t)MT * K * 2, 16) * 16;
    if (MT <= 2 && 2 * (smem + x_bytes) <= (size_t)smem_optin) {
        x_in_smem = (int)smem;
        smem += x_bytes;
    }
    const __half* xh = reinterpret_cast<const __half*>(x);
    const __half* sm = reinterpret_cast<const __half*>(q_scale_max);
    __half* yh = reinterpret_cast<__half*>(y);
    cudaStream_t st = as_stream(stream);
    const int iM = (int)M, iK = (int)K, iN = (int)N, iNp = (int)n_pad, iG = (int)G;
    switch (MT) {
        case 1: launch_tc<1>(xh, q_weight, q_scale, sm, q_groups, q_perm, yh, iM, iK, iN, iNp, iG, ks, ztiles, smem, x_in_smem, st); break;
        case 2: launch_tc<2>(xh, q_weight, q_scale, sm, q_groups, q_perm, yh, iM, iK, iN, iNp, iG, ks, ztiles, smem, x_in_smem, st); break;
        case 4: launch_tc<4>(xh, q_weight, q_scale, sm, q_groups, q_perm, yh, iM, iK, iN, iNp, iG, ks, ztiles, smem, x_in_smem, st); break;
        case 8: launch_tc<8>(xh, q_weight, q_scale, sm, q_groups, q_perm, yh, iM, iK, iN, iNp, iG, ks, ztiles, smem, x_in_smem, st); break;
        default: launch_tc<16>(xh, q_weight, q_scale, sm, q_groups, q_perm, yh, iM, iK, iN, iNp, iG, ks, ztiles, smem, x_in_smem, st); break;
    }
    return true;
}

bool dequant_units(const int32_t* q_weight, const int32_t* q_scale, const int32_t* unit_meta,
                   const int32_t* unit_perm, void* out, int64_t N, int64_t n_pad, int64_t U, uintptr_t stream) {
    if (N <= 0 || U <= 0) return true;
    if (reinterpret_cast<uintptr_t>(q_weight) % 16 || reinterpret_cast<uintptr_t>(out) % 16 || U > 65535) return false;
    const dim3 grid((unsigned)cdiv(cdiv(n_pad, TC_COLS), DQ_WARPS), (unsigned)U);
    dequant_units_kernel<<<grid, DQ_WARPS * 32, 0, as_stream(stream)>>>(
        q_weight, q_scale, reinterpret_cast<const int4*>(unit_meta), unit_perm, reinterpret_cast<__half*>(out),
        (int)N, (int)n_pad);
    check_launch("dequant");
    return true;
}

}  // namespace exl2cuda
