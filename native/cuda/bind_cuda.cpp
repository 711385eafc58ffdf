// Bindings of the CUDA kernels (module exl2build._native.cuda). Same signatures as
// _native.cpu (see native/cpu/bind_cpu.cpp) plus one trailing `stream` argument: the
// cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream). Pointers are device
// pointers passed as Python ints; exl2build/kernels.py has validated every tensor. Kernels
// are enqueued asynchronously on the stream; the GIL is released meanwhile. A failing CUDA
// call raises RuntimeError("<kernel>: <CUDA error>"). Nothing here touches CUDA at import.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#include <cstdint>

#include "gemv_plan.h"
#include "kernels_cuda.cuh"
#include "matmul_gemv.cuh"
#include "matmul_tc.cuh"
#include "pair_factor.h"

namespace py = pybind11;
using P = std::uintptr_t;

namespace {
template <typename T>
T* ptr(P p) {
    return reinterpret_cast<T*>(p);
}

// Linear i / 10 of a decode-sized kernel's descriptor list (10 ints per linear, kernels.gemv_desc).
exl2cuda::GemvLinearDesc gemv_desc_of(const std::vector<int64_t>& d, size_t i) {
    return {ptr<const int32_t>((P)d[i]), ptr<const int32_t>((P)d[i + 1]), ptr<const int32_t>((P)d[i + 2]),
            ptr<const int32_t>((P)d[i + 3]), ptr<void>((P)d[i + 4]), d[i + 5], d[i + 6], d[i + 7], (int)d[i + 8],
            ptr<const uint8_t>((P)d[i + 9])};
}
}  // namespace

void register_cuda(py::module_& m) {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("pack_codes", [](P codes, P out, int64_t R, int64_t N, int bits, P stream) {
        exl2cuda::pack_codes(ptr<const uint8_t>(codes), ptr<int32_t>(out), R, N, bits, stream);
    }, nogil);
    m.def("unpack_codes", [](P packed, P out, int64_t R, int64_t N, int bits, P stream) {
        exl2cuda::unpack_codes(ptr<const int32_t>(packed), ptr<uint8_t>(out), R, N, bits, stream);
    }, nogil);
    m.def("pack_scales", [](P qscale, P out, int64_t G, int64_t N, P stream) {
        exl2cuda::pack_scales(ptr<const uint8_t>(qscale), ptr<int32_t>(out), G, N, stream);
    }, nogil);
    m.def("unpack_scales", [](P q_scale, P out, int64_t G, int64_t N, P stream) {
        exl2cuda::unpack_scales(ptr<const int32_t>(q_scale), ptr<uint8_t>(out), G, N, stream);
    }, nogil);
    m.def("quantize_rows", [](P w, P scale, P codes, P deq, int64_t R, int64_t N, int bits, P stream) {
        exl2cuda::quantize_rows(ptr<const float>(w), ptr<const float>(scale), ptr<uint8_t>(codes), ptr<float>(deq), R,
                                N, bits, stream);
    }, nogil);
    m.def("group_scale_search", [](P w, int64_t R, int64_t N, int bits, double p_min, double p_max, int64_t p_steps,
                                   double norm, P qscale, P scale, P scale_max, P stream) {
        exl2cuda::group_scale_search(ptr<const float>(w), R, N, bits, p_min, p_max, p_steps, norm,
                                     ptr<uint8_t>(qscale), ptr<float>(scale), ptr<float>(scale_max), stream);
    }, nogil);
    m.def("gptq_group", [](P w, P hinv, P scale, P codes, P err, int64_t g, int64_t N, int bits, P stream) {
        exl2cuda::gptq_group(ptr<float>(w), ptr<const float>(hinv), ptr<const float>(scale), ptr<uint8_t>(codes),
                             ptr<float>(err), g, N, bits, stream);
    }, nogil);
    m.def("dequant", [](P qw, P qs, P qsm, P qg, P invperm, P out, int64_t K, int64_t N, int64_t n_pad, int64_t G,
                        bool out_is_f16, P stream) {
        exl2cuda::dequant(ptr<const int32_t>(qw), ptr<const int32_t>(qs), ptr<const uint16_t>(qsm),
                          ptr<const int16_t>(qg), ptr<const int32_t>(invperm), ptr<void>(out), K, N, n_pad, G,
                          out_is_f16, stream);
    }, nogil);
    // fp16 dequantization by 32-row units (q_perm instead of q_invperm); returns False when it does
    // not apply (alignment, group table too large), and the caller falls back to "dequant".
    m.def("dequant_units", [](P qw, P qs, P unit_meta, P unit_perm, P out, int64_t N, int64_t n_pad, int64_t U,
                              P stream) {
        return exl2cuda::dequant_units(ptr<const int32_t>(qw), ptr<const int32_t>(qs), ptr<const int32_t>(unit_meta),
                                       ptr<const int32_t>(unit_perm), ptr<void>(out), N, n_pad, U, stream);
    }, nogil);
    m.def("exl2_matmul", [](P x, P qw, P qs, P qsm, P qg, P perm, P y, int64_t M, int64_t K, int64_t N, int64_t n_pad,
                            int64_t G, bool io_is_f16, P stream) {
        exl2cuda::exl2_matmul(ptr<const void>(x), ptr<const int32_t>(qw), ptr<const int32_t>(qs),
                              ptr<const uint16_t>(qsm), ptr<const int16_t>(qg), ptr<const int32_t>(perm), ptr<void>(y),
                              M, K, N, n_pad, G, io_is_f16, stream);
    }, nogil);
    // Tuning entry for benchmarks/kernels.py: the same kernel with the launch shape forced
    // (cols_per_thread 1 or 2; k_splits 1..8, >1 only on sm_90; 0 = the default choice) and
    // flags (8 = the SIMT kernel for f16 too, 16 = the tensor-core kernel also at M = 1; SIMT tuning: 1 = shallow load pipeline, 2 = no L2 prefetch,
    // 4 = L2 prefetch of all units; 0 = default). k_splits applies to both kernels, cols_per_thread to SIMT.
    m.def("exl2_matmul_cfg", [](P x, P qw, P qs, P qsm, P qg, P perm, P y, int64_t M, int64_t K, int64_t N,
                                int64_t n_pad, int64_t G, bool io_is_f16, P stream, int cols_per_thread, int k_splits,
                                int flags) {
        exl2cuda::exl2_matmul(ptr<const void>(x), ptr<const int32_t>(qw), ptr<const int32_t>(qs),
                              ptr<const uint16_t>(qsm), ptr<const int16_t>(qg), ptr<const int32_t>(perm), ptr<void>(y),
                              M, K, N, n_pad, G, io_is_f16, stream, cols_per_thread, k_splits, flags);
    }, nogil);
    // F of half h (0: code r, 1: code r + 4) of pair r (0..3) at `bits`: where the CUDA decoders
    // leave the code (pair_factor.h); for the test that holds kernels.unit_tables' packed factors to it.
    m.def("pair_factor", [](int bits, int r, int h) {
        if (r < 0 || r > 3) throw std::invalid_argument("pair_factor: r is 0..3");
        if (h < 0 || h > 1) throw std::invalid_argument("pair_factor: h is 0 (low half) or 1 (high half)");
        if (bits < 2 || bits > 8 || bits == 7) throw std::invalid_argument("pair_factor: bits is 2, 3, 4, 5, 6 or 8");
        return exl2cuda::pair_factor_of(bits, r, h);
    });
    // The decode-sized kernel's launch shape for linears [(n_pad, U, max_bits), ...] at M tokens on a
    // device with these figures (gemv_plan.h, a host function: no GPU needed); None where the kernel
    // does not apply, else a dict W, NT, ks, kw, smem, blocks. For the tests and the benchmarks.
    m.def("gemv_plan", [](const std::vector<std::tuple<int64_t, int64_t, int>>& lins, int64_t M, int sms,
                          int smem_optin, int smem_per_sm, int smem_reserved, int warps, int k_splits,
                          int k_warps) -> py::object {
        if (lins.empty() || lins.size() > (size_t)exl2cuda::GV_MAX_LINEARS)
            throw std::invalid_argument("gemv_plan: 1 to 3 linears");
        std::vector<exl2cuda::GemvShape> shapes;
        for (const auto& [n_pad, U, max_bits] : lins) shapes.push_back({n_pad, U, max_bits});
        const exl2cuda::GemvPlan p = exl2cuda::gemv_plan(shapes.data(), (int)shapes.size(), M,
                                                         {sms, smem_optin, smem_per_sm, smem_reserved}, warps,
                                                         k_splits, k_warps);
        if (!p.ok) return py::none();
        return py::dict(py::arg("W") = p.W, py::arg("NT") = p.NT, py::arg("ks") = p.ks, py::arg("kw") = p.kw,
                        py::arg("smem") = p.smem, py::arg("blocks") = p.blocks);
    });
    // The decode-sized kernel's K split of units of these widths (gemv_plan.h's gemv_split, host code:
    // no GPU needed) over ks splits with fixed part cost_c (negative: equal unit counts): ks + 1 bounds.
    m.def("gemv_split", [](const std::vector<uint8_t>& bits, int ks, int cost_c) {
        if (ks < 1 || ks > exl2cuda::GV_MAX_KS) throw std::invalid_argument("gemv_split: ks is 1..16");
        exl2cuda::GemvShape s{0, (int64_t)bits.size(), 8, bits.data(), cost_c};
        std::vector<int32_t> out(ks + 1);
        exl2cuda::gemv_split(s, ks, out.data());
        return out;
    });
    m.attr("gemv_cost_c") = exl2cuda::GV_COST_C;
    // The decode-sized kernel (M <= 32, sm_90) with the per-unit tables of kernels.unit_tables;
    // returns False when it does not apply. warps (2 or 4, 0 = default), k_splits (1..16, 0 = choose)
    // and k_warps (warps along K: 1, 2, 4; 0 = choose) are for benchmarks/kernels.py.
    m.def("exl2_matmul_gemv", [](P x, P qw, P qs, P umeta, P uperm, P y, int64_t M, int64_t K, int64_t N,
                                 int64_t n_pad, int64_t U, int max_bits, P unit_bits, int warps, int k_splits,
                                 int k_warps, P stream) {
        return exl2cuda::exl2_matmul_gemv(ptr<const void>(x), ptr<const int32_t>(qw), ptr<const int32_t>(qs),
                                          ptr<const int32_t>(umeta), ptr<const int32_t>(uperm), ptr<void>(y), M, K,
                                          N, n_pad, U, max_bits, ptr<const uint8_t>(unit_bits), stream,
                                          exl2cuda::device_sm_count(),
                                          exl2cuda::device_cc_major(), exl2cuda::device_smem_optin(), warps,
                                          k_splits, k_warps);
    }, nogil);
    // Several linears reading the same x in one launch (q, k, v; gate, up): `desc` holds 10 ints per
    // linear (q_weight, q_scale, unit_meta, unit_perm, y, N, n_pad, U, max_bits, unit_bits: a host
    // pointer or 0); false: not launched.
    m.def("exl2_matmul_gemv_group", [](P x, std::vector<int64_t> desc, int64_t M, int64_t K, int warps,
                                       int k_splits, int k_warps, P stream) {
        if (desc.size() % 10 || desc.size() > 30) throw std::invalid_argument("exl2_matmul_gemv_group: 10 ints per linear, 1-3 linears");
        std::vector<exl2cuda::GemvLinearDesc> lins;
        for (size_t i = 0; i < desc.size(); i += 10) lins.push_back(gemv_desc_of(desc, i));
        py::gil_scoped_release release;
        return exl2cuda::exl2_matmul_gemv_group(ptr<const void>(x), lins.data(), (int)lins.size(), M, K, stream,
                                                exl2cuda::device_sm_count(), exl2cuda::device_cc_major(),
                                                exl2cuda::device_smem_optin(), warps, k_splits, k_warps);
    });
    // The SwiGLU MLP's down projection: y = (silu(gate) * up) @ W in one launch of the decode-sized
    // kernel, silu(gate) * up computed as x is staged (silu_mul's roundings). `desc`: 10 ints of one
    // linear, as above; false: not launched.
    m.def("exl2_matmul_gemv_swiglu", [](P gate, P up, std::vector<int64_t> desc, int64_t M, int64_t K, P stream) {
        if (desc.size() != 10) throw std::invalid_argument("exl2_matmul_gemv_swiglu: 10 ints for one linear");
        const exl2cuda::GemvLinearDesc d = gemv_desc_of(desc, 0);
        py::gil_scoped_release release;
        return exl2cuda::exl2_matmul_gemv_group(ptr<const void>(gate), &d, 1, M, K, stream,
                                                exl2cuda::device_sm_count(), exl2cuda::device_cc_major(),
                                                exl2cuda::device_smem_optin(), 0, 0, 0, ptr<const void>(up));
    });
#ifdef EXL2BUILD_PHASE_PROBE
    // The diagnostic build only (CMake EXL2BUILD_PHASE_PROBE): the decode-sized kernel's phase stamps.
    m.attr("gemv_phase_shape") = py::make_tuple(exl2cuda::GV_PROBE_BLOCKS, exl2cuda::GV_PROBE_SLOTS);
    m.def("gemv_phase_copy", [](P dst, bool clear, P stream) { exl2cuda::gemv_phase_copy(ptr<void>(dst), clear, stream); });
#endif
    m.def("logit_stats", [](P logits, bool is_f16, int64_t T, int64_t V, P targets, P ref_idx, P ref_logp, int64_t k,
                            P nll, P argmax, P kld, P stream) {
        exl2cuda::logit_stats(ptr<const void>(logits), is_f16, T, V, ptr<const int64_t>(targets),
                              ptr<const int32_t>(ref_idx), ptr<const float>(ref_logp), k, ptr<float>(nll),
                              ptr<int64_t>(argmax), ptr<float>(kld), stream);
    }, nogil);
    // The forward pass's fused f16 operations (forward.cu); exl2build/kernels.py checks the tensors.
    m.def("rms_norm", [](P x, P residual, P w, P out, P h_out, int64_t rows, int64_t dim, float eps, P stream) {
        exl2cuda::rms_norm(ptr<const void>(x), ptr<const void>(residual), ptr<const float>(w), ptr<void>(out),
                           ptr<void>(h_out), rows, dim, eps, stream);
    }, nogil);
    m.def("rope_cache", [](P q, P k, P v, P cos_t, P sin_t, P k_cache, P v_cache, P pos, int64_t start, int64_t B,
                           int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t max_len, P stream) {
        exl2cuda::rope_cache(ptr<void>(q), ptr<const void>(k), ptr<const void>(v), ptr<const void>(cos_t),
                             ptr<const void>(sin_t), ptr<void>(k_cache), ptr<void>(v_cache), ptr<const int64_t>(pos),
                             start, B, T, H, Hkv, D, max_len, stream);
    }, nogil);
    // k_new, v_new, cos_t, sin_t: 0, or the new token's (RoPE and the cache stores in the same launch).
    m.def("decode_attention", [](P q, P k_cache, P v_cache, P pos, P out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                 int64_t L, P k_new, P v_new, P cos_t, P sin_t, P stream) {
        exl2cuda::decode_attention(ptr<const void>(q), ptr<const void>(k_cache), ptr<const void>(v_cache),
                                   ptr<const int64_t>(pos), ptr<void>(out), B, H, Hkv, D, L,
                                   exl2cuda::device_sm_count(), stream, ptr<const void>(k_new),
                                   ptr<const void>(v_new), ptr<const void>(cos_t), ptr<const void>(sin_t));
    }, nogil);
    m.def("silu_mul", [](P g, P u, P out, int64_t n, P stream) {
        exl2cuda::silu_mul(ptr<const void>(g), ptr<const void>(u), ptr<void>(out), n, stream);
    }, nogil);
    m.def("device_sm_count", []() { return exl2cuda::device_sm_count(); }, "SMs of the current device");
    m.def("device_gemv_figures", []() {
        return py::make_tuple(exl2cuda::device_sm_count(), exl2cuda::device_smem_optin(), exl2cuda::device_smem_per_sm(),
                              exl2cuda::device_smem_reserved());
    }, "(SMs, shared memory per block opt-in, per SM, reserved per block): gemv_plan's device figures");
}
