// The Python module tallytrain._C. Importing it runs the static
// TORCH_LIBRARY_IMPL registrations of every kernel file linked into it; the
// module itself reports how it was built and chooses the CPU level the
// kernels run at (csrc/cpu/cpu_level.h; tallytrain/ops/_backend.py reads
// TALLYTRAIN_CPU_LEVEL and calls set_cpu_level).
#include <torch/extension.h>

#include <string>

#include "cpu/cpu_level.h"

namespace {

using tallytrain::cpu::Level;

pybind11::list level_names(const std::vector<Level>& levels) {
  pybind11::list names;
  for (auto it = levels.rbegin(); it != levels.rend(); ++it)
    names.append(tallytrain::cpu::level_name(*it));
  return names;
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
    return info;
  });
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
