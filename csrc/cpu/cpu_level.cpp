// Which CPU level runs the kernels (cpu_level.h).
#include "cpu_level.h"

namespace tallytrain {
namespace cpu {

namespace detail {
std::atomic<int> active_level{-1};
}  // namespace detail

namespace {

// Whether the CPU (and the OS, which must save the wider registers) runs the
// level's instructions; libgcc's checks include the OS part.
bool cpu_runs(Level level) {
#if TT_X86_LEVELS
  switch (level) {
    case Level::kV4:
      return __builtin_cpu_supports("x86-64-v4");
    case Level::kV3:
      return __builtin_cpu_supports("x86-64-v3");
    case Level::kV2:
      return __builtin_cpu_supports("x86-64-v2");
    case Level::kBaseline:
      return true;
  }
  return false;
#else
  return level == Level::kBaseline;
#endif
}

}  // namespace

const char* level_name(Level level) {
  switch (level) {
    case Level::kV4:
      return "v4";
    case Level::kV3:
      return "v3";
    case Level::kV2:
      return "v2";
    case Level::kBaseline:
      break;
  }
  return "baseline";
}

std::vector<Level> built_levels() {
#if TT_X86_LEVELS
  return {Level::kBaseline, Level::kV2, Level::kV3, Level::kV4};
#else
  return {Level::kBaseline};
#endif
}

bool level_supported(Level level) {
  for (const Level built : built_levels())
    if (built == level) return cpu_runs(level);
  return false;
}

bool set_active_level(Level level) {
  if (!level_supported(level)) return false;
  detail::active_level.store(static_cast<int>(level), std::memory_order_relaxed);
  return true;
}

Level detail::detect_active_level() {
  Level best = Level::kBaseline;
  for (const Level level : built_levels())
    if (cpu_runs(level)) best = level;
  // Racing first calls all store the same value.
  int expected = -1;
  active_level.compare_exchange_strong(expected, static_cast<int>(best));
  return static_cast<Level>(active_level.load(std::memory_order_relaxed));
}

}  // namespace cpu
}  // namespace tallytrain
