// Bindings of the CPU kernels. Each takes raw pointers (as integers) and sizes; the GIL
// is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <omp.h>

namespace py = pybind11;

void register_cpu(py::module_& m) {
    m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads the CPU kernels use");
}
