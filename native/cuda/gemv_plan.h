// The launch shape of the decode-sized kernel (matmul_gemv.cu), chosen on the host: warps per
// block, token tiles, K splits (cluster size), warps along K, shared memory. A plain header, so the
// bindings can expose it and the CPU tests can pin its choices for given device figures.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace exl2cuda {

constexpr int GV_COLS = 64;        // output columns per warp
constexpr int GV_ROW_WORDS = 72;   // one word row of a stage: 64 words + 8 of padding (conflict-free reads)
constexpr int GV_STAGES = 6;       // ring depth per warp
constexpr int GV_MAX_KS = 16;      // cluster size limit on sm_90 (non-portable above 8)
constexpr int GV_MAX_M = 32;       // tokens: up to 4 tiles of 8 in the mma's n dimension
constexpr int GV_MAX_LINEARS = 3;  // linears of one launch (q, k, v)
constexpr int GV_COST_C = 5;        // gemv_split's fixed part of a unit, in bits (its comment)
constexpr int GV_PROBE_BLOCKS = 8192, GV_PROBE_SLOTS = 8;  // the diagnostic build's phase stamps

// What the plan needs of one linear: padded columns, 32-row units, largest bit width; for a linear
// of several widths, each unit's width (host memory, U entries; null: one width) and the split's
// cost constant (gemv_split).
struct GemvShape {
    int64_t n_pad, U;
    int max_bits;
    const uint8_t* unit_bits = nullptr;
    int cost_c = -1;
};

// gemv_split where the units differ in width: equal shares of sum(bits + cost_c). out holds the
// equal-count bounds on entry (out[0] = 0, out[ks] = U).
inline void gemv_split_by_cost(const GemvShape& s, int ks, int32_t* out) {
    const int64_t U = s.U;
    int64_t total = 0;
    for (int64_t u = 0; u < U; ++u) total += s.unit_bits[u] + s.cost_c;
    int64_t u = 0, acc = 0;
    for (int r = 1; r < ks; ++r) {
        const int64_t target = total * r / ks;
        // the last boundary at or below the target share (for one width: U * r / ks, the equal counts)
        while (u < U && acc + (s.unit_bits[u] + s.cost_c) <= target) acc += s.unit_bits[u++] + s.cost_c;
        int64_t b = u;
        if (U >= ks) b = std::max<int64_t>(b, out[r - 1] + 1), b = std::min<int64_t>(b, U - (ks - r));
        b = std::max<int64_t>(b, out[r - 1]);
        out[r] = (int32_t)b;
    }
}

// The K split: split r (0..ks-1) takes units [out[r], out[r + 1]), out holding ks + 1 entries.
// Where the units differ in width (unit_bits) and cost_c >= 0, the splits take equal shares of
// sum(bits + cost_c) instead of equal unit counts: a unit's time in the loop is its bytes plus a
// fixed part (the decode, the mma, the bookkeeping). H100, session 12 (benchmarks/RESULTS.md): the
// K splits holding 3-bit units ran 15 % longer than those holding as many 2-bit ones, i.e. a fixed
// part of ~5 bits' worth. Every split keeps at least one unit while U >= ks; the result is the same
// on every call (the partial sums are still added in rank order). Returns the most units a split
// holds (the block's shared-memory layout).
inline int64_t gemv_split(const GemvShape& s, int ks, int32_t* out) {
    const int64_t U = s.U;
    for (int r = 0; r <= ks; ++r) out[r] = (int32_t)(U * r / ks);
    if (s.unit_bits && s.cost_c >= 0 && ks > 1) gemv_split_by_cost(s, ks, out);
    int64_t m = 0;
    for (int r = 0; r < ks; ++r) m = std::max<int64_t>(m, out[r + 1] - out[r]);
    return m;
}

// The most units any split of gemv_split holds.
inline int64_t gemv_split_max(const GemvShape& s, int ks) {
    int32_t b[GV_MAX_KS + 1];
    return ks < 1 || ks > GV_MAX_KS ? 0 : gemv_split(s, ks, b);
}

// The device's figures (cudaDevAttr...: multiprocessors, shared memory per block opt-in, per SM,
// reserved per block).
struct GemvDevice {
    int sms, smem_optin, smem_per_sm, smem_reserved;
};

struct GemvPlan {
    bool ok = false;  // false: the kernel does not apply (the caller takes another path)
    int W = 0, NT = 0, ks = 0, kw = 0;
    size_t smem = 0;      // dynamic shared memory per block
    int64_t blocks = 0;  // blocks along x (column tiles of all linears); ks along y
};

inline int64_t gemv_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks along x for one linear: its 64-column tiles, tiles_per_block (W / kw) to a block.
inline int64_t gemv_col_blocks(int64_t n_pad, int tiles_per_block) {
    return gemv_cdiv(gemv_cdiv(n_pad, GV_COLS), tiles_per_block);
}

// Shared memory of a block of a linear (stages, x, unit_meta with its spare entries, sum(x) terms,
// partial sums) at k K splits.
inline size_t gemv_smem(const GemvShape& s, int64_t M, int W, int NT, int k) {
    const int64_t nu_max = gemv_split_max(s, k);
    const int64_t xs_bytes = gemv_cdiv(nu_max * M * 32 * 2, 16) * 16;
    const int64_t stage_words = s.max_bits * GV_ROW_WORDS + 8;
    return (size_t)((int64_t)W * GV_STAGES * stage_words * 4 + xs_bytes + (nu_max + GV_STAGES) * 16 +
                    nu_max * 32 * NT + 32 * NT + M * W * GV_COLS * 4);
}

// warps: 2 or 4 per block (0 = 4); k_splits: 0 = choose, else 1..16; k_warps: warps along K
// (0 = choose, else 1, 2 or 4 dividing the warps).
inline GemvPlan gemv_plan(const GemvShape* lins, int count, int64_t M, const GemvDevice& dev, int warps = 0,
                          int k_splits = 0, int k_warps = 0) {
    GemvPlan p;
    if (M <= 0 || M > GV_MAX_M || count < 1 || count > GV_MAX_LINEARS) return p;
    const int NT = M <= 8 ? 1 : M <= 16 ? 2 : 4;
    int64_t tiles = 0, u_min = INT64_MAX;
    for (int l = 0; l < count; ++l) {
        const GemvShape& d = lins[l];
        if (d.U <= 0 || d.n_pad <= 0 || d.max_bits < 2 || d.max_bits > 8) return p;
        // 32-bit byte offsets inside q_weight and q_scale (LaneCopy): U units of at most 8 word rows.
        if ((d.U * 8 + 8) * d.n_pad * 4 >= (1LL << 31)) return p;
        if (d.U * GV_MAX_KS >= (1LL << 31)) return p;  // the kernel's 32-bit unit ranges
        tiles += gemv_cdiv(d.n_pad, GV_COLS);
        u_min = std::min(u_min, d.U);
    }
    const int W = warps == 2 ? 2 : 4;
    // Enough warps to keep ~16 per SM streaming (one per 64 columns and K split), at least 4 units
    // per block.
    int ks;
    if (k_splits > 0) {
        ks = std::min(k_splits, GV_MAX_KS);
    } else {
        ks = (int)std::max<int64_t>(1, std::min<int64_t>(GV_MAX_KS, (16LL * dev.sms + tiles / 2) / tiles));
        ks = (int)std::min<int64_t>(ks, std::max<int64_t>(1, u_min / 4));
        // A power of two: clusters of 9 or 12 blocks ran 10-30 % slower than 8 or 16 on the H200
        // (benchmarks/RESULTS.md, the decode-sized kernel's sweep).
        while (ks & (ks - 1)) ks &= ks - 1;
    }
    // The launch takes the largest block of its linears.
    auto smem_max = [&](int k) {
        size_t m = 0;
        for (int l = 0; l < count; ++l) m = std::max(m, gemv_smem(lins[l], M, W, NT, k));
        return m;
    };
    while (smem_max(ks) > (size_t)dev.smem_optin && ks < GV_MAX_KS) ++ks;
    // 2-8 tokens: the largest power of two of K splits, at most the default, whose blocks are all
    // resident at once (by shared memory and the launch bound). A block's x and partial sums grow
    // with M, and a partial second wave cost more than the splits it added (H200 sweep, session 8:
    // 4096x14336 at 6.0 bpw, M = 8, 48 -> 39 us with 4 splits instead of 8; 8192x28672 at 2.5 / 4.0
    // bpw 97 / 96 -> 85 / 78 us with 2 instead of 4). At M = 1 the extra splits won even then.
    // No fit from 2 up: the default stays (8192x28672 at 6.0 bpw was slower with fewer).
    if (k_splits <= 0 && k_warps <= 0 && M > 1 && NT == 1) {
        int64_t col_blocks = 0;
        for (int l = 0; l < count; ++l) col_blocks += gemv_col_blocks(lins[l].n_pad, W);
        const int per_sm_bound = 16 / W / NT;
        for (int k = ks; k >= 2; k >>= 1) {
            const size_t sm = smem_max(k);
            const int per_sm = std::min<int>(per_sm_bound, (int)(dev.smem_per_sm / (int64_t)(sm + dev.smem_reserved)));
            if (sm <= (size_t)dev.smem_optin && col_blocks * k <= (int64_t)per_sm * dev.sms) {
                ks = k;
                break;
            }
        }
    }
    // Warps along K: where even 16 K splits leave the SMs short of warps (N up to ~8K: 64 columns
    // per warp), 2 warps of a block split its units, over 12 K splits. At M = 1 on the H200 that
    // was the fastest (warps along K, K splits) pair on 4096x4096 and 14336x4096 at 2.5, 4.0 and
    // 6.0 bpw but for 4096x4096 at 4.0 bpw (8 % behind (2, 8)); 14336x4096 gained 9-15 % over
    // 16 K splits alone (benchmarks/RESULTS.md, session 6 sweep; clusters of 12 were slower with
    // kw = 1). At M = 8 the same choice was 1.5x slower on 14336x4096, so it stays at M = 1.
    //
    // At 2-8 tokens, where all 16 K splits fit and leave a warp fewer than 16 units (K below
    // 8192), 2 warps along K over 8 splits: the same warps and units per warp, but half the ranks
    // whose M x 64 partial sums the cluster reduces, and that reduction outweighed the few units.
    // H100 sweep, session 16 (benchmarks/RESULTS.md), 4096x4096 at M = 8: 28.6 -> 17.3 us at 6.0
    // bpw, 25.3 -> 18.3 us at 2.5 bpw. 14336x4096 (28 units a warp) stays: there it was 14 %
    // slower at 6.0 bpw and 9 % faster at 2.5 bpw.
    int kw = 1;
    if (k_warps > 0) {
        kw = k_warps;
    } else if (k_splits <= 0 && M == 1 && ks == GV_MAX_KS && W == 4 && u_min >= 2 * 12 * 4 &&
               smem_max(12) <= (size_t)dev.smem_optin) {
        kw = 2;
        ks = 12;
    } else if (k_splits <= 0 && M > 1 && NT == 1 && ks == GV_MAX_KS && W == 4 && u_min < 16 * GV_MAX_KS &&
               u_min >= 2 * 8 && smem_max(8) <= (size_t)dev.smem_optin) {
        kw = 2;
        ks = 8;
    }
    if (kw < 1 || W % kw) return p;
    const size_t smem = smem_max(ks);
    if (smem > (size_t)dev.smem_optin) return p;
    int64_t blocks = 0;
    for (int l = 0; l < count; ++l) blocks += gemv_col_blocks(lins[l].n_pad, W / kw);
    p.ok = true;
    p.W = W;
    p.NT = NT;
    p.ks = ks;
    p.kw = kw;
    p.smem = smem;
    p.blocks = blocks;
    return p;
}

}  // namespace exl2cuda
