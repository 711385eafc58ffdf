// The pybind11 module exl2build._native.
// The module never links libtorch: exl2build/kernels.py validates every tensor and
// passes raw pointers, sizes and (for CUDA) the current stream.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_cpu(py::module_& m);   // native/cpu/bind_cpu.cpp
#ifdef EXL2BUILD_WITH_CUDA
void register_cuda(py::module_& m);  // native/cuda/bind_cuda.cpp
#endif

PYBIND11_MODULE(_native, m) {
    m.doc() = "exl2build native kernels (CPU always, CUDA when built)";
#ifdef EXL2BUILD_WITH_CUDA
    m.attr("built_with_cuda") = true;
    auto cuda = m.def_submodule("cuda", "CUDA kernels");
    register_cuda(cuda);
#else
    m.attr("built_with_cuda") = false;
#endif
    auto cpu = m.def_submodule("cpu", "CPU kernels");
    register_cpu(cpu);
}
