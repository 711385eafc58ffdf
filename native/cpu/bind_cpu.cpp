// Bindings of the CPU kernels (module exl2build._native.cpu). Every kernel takes raw
// pointers as Python ints (tensor.data_ptr()) and int64 sizes; exl2build/kernels.py has
// checked devices, dtypes, shapes and contiguity before calling. The GIL is released
// while a kernel runs. _native.cuda mirrors these with one extra trailing `stream` int.
//
//   pack_codes(codes_u8, out_i32, R, N, bits)
//   unpack_codes(packed_i32, out_u8, R, N, bits)
//   pack_scales(qscale_u8, out_i32, G, N)
//   unpack_scales(q_scale_i32, out_u8, G, N)
//   quantize_rows(w_f32, scale_f32, codes_u8, deq_f32, R, N, bits)
//   group_scale_search(w_f32, R, N, bits, p_min, p_max, p_steps, norm,
//                      qscale_out_u8, scale_out_f32, scale_max_out_f32 /*1 element*/)
//   gptq_group(w_f32, hinv_f32, scale_f32, codes_u8, err_f32, g, N, bits)
//       hinv is a contiguous g x g copy; w [g, N] is updated in place to the dequantized rows
//   dequant(q_weight_i32, q_scale_i32, q_scale_max_f16, q_groups_i16, q_invperm_i32, out,
//           K, N, n_pad, G, out_is_f16)                 out [K, N] f16 or f32, original row order
//   exl2_matmul(x, q_weight_i32, q_scale_i32, q_scale_max_f16, q_groups_i16, q_perm_i32, y,
//               M, K, N, n_pad, G, io_is_f16)          y [M, N] = x [M, K] @ W, f32 math
//   logit_stats(logits, logits_is_f16, T, V, targets_i64, ref_idx_i32_or_0, ref_logp_f32_or_0,
//               k, nll_out_f32, argmax_out_i64, kld_out_f32_or_0)
#include <pybind11/pybind11.h>
#include <omp.h>

#include "common.h"
#include "kernels_cpu.h"

namespace py = pybind11;
using P = std::uintptr_t;
using exl2::ptr;

void register_cpu(py::module_& m) {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use");
    m.def("pack_codes", [](P codes, P out, int64_t R, int64_t N, int bits) {
        exl2::pack_codes(ptr<const uint8_t>(codes), ptr<int32_t>(out), R, N, bits);
    }, nogil);
    m.def("unpack_codes", [](P packed, P out, int64_t R, int64_t N, int bits) {
        exl2::unpack_codes(ptr<const int32_t>(packed), ptr<uint8_t>(out), R, N, bits);
    }, nogil);
    m.def("pack_scales", [](P qscale, P out, int64_t G, int64_t N) {
        exl2::pack_scales(ptr<const uint8_t>(qscale), ptr<int32_t>(out), G, N);
    }, nogil);
    m.def("unpack_scales", [](P q_scale, P out, int64_t G, int64_t N) {
        exl2::unpack_scales(ptr<const int32_t>(q_scale), ptr<uint8_t>(out), G, N);
    }, nogil);
    m.def("quantize_rows", [](P w, P scale, P codes, P deq, int64_t R, int64_t N, int bits) {
        exl2::quantize_rows(ptr<const float>(w), ptr<const float>(scale), ptr<uint8_t>(codes),
                            ptr<float>(deq), R, N, bits);
    }, nogil);
    m.def("group_scale_search", [](P w, int64_t R, int64_t N, int bits, double p_min, double p_max,
                                   int64_t p_steps, double norm, P qscale, P scale, P scale_max) {
        exl2::group_scale_search(ptr<const float>(w), R, N, bits, p_min, p_max, p_steps, norm,
                                 ptr<uint8_t>(qscale), ptr<float>(scale), ptr<float>(scale_max));
    }, nogil);
    m.def("gptq_group", [](P w, P hinv, P scale, P codes, P err, int64_t g, int64_t N, int bits) {
        exl2::gptq_group(ptr<float>(w), ptr<const float>(hinv), ptr<const float>(scale),
                         ptr<uint8_t>(codes), ptr<float>(err), g, N, bits);
    }, nogil);
    m.def("dequant", [](P qw, P qs, P qsm, P qg, P invperm, P out, int64_t K, int64_t N, int64_t n_pad,
                        int64_t G, bool out_is_f16) {
        exl2::dequant(ptr<const int32_t>(qw), ptr<const int32_t>(qs), ptr<const uint16_t>(qsm),
                      ptr<const int16_t>(qg), ptr<const int32_t>(invperm), ptr<void>(out), K, N, n_pad, G,
                      out_is_f16);
    }, nogil);
    m.def("exl2_matmul", [](P x, P qw, P qs, P qsm, P qg, P perm, P y, int64_t M, int64_t K, int64_t N,
                            int64_t n_pad, int64_t G, bool io_is_f16) {
        exl2::exl2_matmul(ptr<const void>(x), ptr<const int32_t>(qw), ptr<const int32_t>(qs),
                          ptr<const uint16_t>(qsm), ptr<const int16_t>(qg), ptr<const int32_t>(perm),
                          ptr<void>(y), M, K, N, n_pad, G, io_is_f16);
    }, nogil);
    m.def("logit_stats", [](P logits, bool is_f16, int64_t T, int64_t V, P targets, P ref_idx, P ref_logp,
                            int64_t k, P nll, P argmax, P kld) {
        exl2::logit_stats(ptr<const void>(logits), is_f16, T, V, ptr<const int64_t>(targets),
                          ptr<const int32_t>(ref_idx), ptr<const float>(ref_logp), k, ptr<float>(nll),
                          ptr<int64_t>(argmax), ptr<float>(kld));
    }, nogil);
}
