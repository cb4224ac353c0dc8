// The Python module tallytrain._C. Importing it runs the static
// TORCH_LIBRARY_IMPL registrations of every kernel file linked into it; the
// module itself only reports how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef TALLYTRAIN_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    return info;
  });
}
