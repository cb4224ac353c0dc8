// The Python module tallytrain._C. It reports how it was built (the torch
// and CUDA versions among it), registers the kernels of every file linked
// into it when asked (tallytrain/registration.h: tallytrain/ops/_backend.py
// asks once the versions agree with the running torch), and chooses the CPU
// level the kernels run at (csrc/cpu/cpu_level.h; _backend.py reads
// TALLYTRAIN_CPU_LEVEL and calls set_cpu_level).
#include <torch/extension.h>

#include <memory>
#include <string>
#include <vector>

#include "cpu/cpu_level.h"
#include "tallytrain/registration.h"

// setup.py writes the versions of the torch it builds against here; a
// compile outside setup.py (make check-aarch64) records none.
#if __has_include("tallytrain_build_versions.h")
#include "tallytrain_build_versions.h"
#else
#define TALLYTRAIN_BUILT_TORCH ""
#define TALLYTRAIN_BUILT_TORCH_CUDA ""
#endif

namespace {

using tallytrain::cpu::Level;

pybind11::list level_names(const std::vector<Level>& levels) {
  pybind11::list names;
  for (auto it = levels.rbegin(); it != levels.rend(); ++it)
    names.append(tallytrain::cpu::level_name(*it));
  return names;
}

// Runs every recorded kernel block once (registration.h); the Library
// objects live as long as the process, as TORCH_LIBRARY_IMPL's would.
void register_kernels() {
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  static bool registered = false;
  if (registered) return;
  registered = true;
  for (const tallytrain::PendingKernels& p : tallytrain::pending_kernels()) {
    libraries.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, "tallytrain", p.key,
                                                         p.file, p.line));
    p.block(*libraries.back());
  }
}

pybind11::object version_or_none(const char* version) {
  if (*version == 0) return pybind11::none();
  return pybind11::str(version);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef TALLYTRAIN_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    // The CPU levels the kernels were compiled for, best first.
    info["cpu_levels"] = level_names(tallytrain::cpu::built_levels());
    // torch.__version__ and torch.version.cuda of the torch built against.
    info["torch"] = version_or_none(TALLYTRAIN_BUILT_TORCH);
    info["torch_cuda"] = version_or_none(TALLYTRAIN_BUILT_TORCH_CUDA);
    return info;
  });
  m.def("register_kernels", &register_kernels,
        "Registers the CPU (and CUDA) kernels with the dispatcher; later calls do nothing.");
  m.def(
      "cpu_levels",
      []() {
        std::vector<Level> supported;
        for (const Level level : tallytrain::cpu::built_levels())
          if (tallytrain::cpu::level_supported(level)) supported.push_back(level);
        return level_names(supported);
      },
      "The CPU levels this build has and this CPU runs, best first.");
  m.def(
      "cpu_level", []() { return std::string(level_name(tallytrain::cpu::active_level())); },
      "The CPU level the kernels run at.");
  m.def(
      "set_cpu_level",
      [](const std::string& name) {
        for (const Level level : tallytrain::cpu::built_levels()) {
          if (name != tallytrain::cpu::level_name(level)) continue;
          if (!tallytrain::cpu::set_active_level(level))
            throw pybind11::value_error("CPU level " + name + " is not supported by this CPU");
          return;
        }
        throw pybind11::value_error("CPU level " + name + " is not in this build");
      },
      "Runs every later kernel call at the named CPU level (one of cpu_levels()).");
}
