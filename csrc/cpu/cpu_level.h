// The CPU level the kernels run at, chosen at run time.
//
// On x86-64 (built with GCC >= 12) every vectorised kernel is compiled once
// per level of the x86-64 psABI: baseline (SSE2), v2 (SSE4.2, SSSE3,
// POPCNT), v3 (AVX2, FMA, BMI2, F16C) and v4 (AVX-512 F/BW/CD/DQ/VL);
// simd.h's dispatch() runs the copy of the active level. The active level is
// the best one the CPU has, unless set_active_level() chose another (from
// TALLYTRAIN_CPU_LEVEL, in tallytrain/ops/_backend.py). Other architectures
// and compilers get one portable copy, the level "baseline": the compiler's
// default target (NEON on aarch64).
#pragma once
#include <atomic>
#include <vector>

namespace tallytrain {
namespace cpu {

enum class Level : int { kBaseline = 0, kV2 = 1, kV3 = 2, kV4 = 3 };
constexpr int kNumLevels = 4;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TT_X86_LEVELS 1
#else
#define TT_X86_LEVELS 0
#endif

// "baseline", "v2", "v3", "v4".
const char* level_name(Level level);

// The levels this build has copies for, lowest first.
std::vector<Level> built_levels();

// Whether this build has the level and the CPU runs its instructions.
bool level_supported(Level level);

// Makes `level` active for every later kernel call; false (and nothing
// changed) if it is not supported.
bool set_active_level(Level level);

namespace detail {
extern std::atomic<int> active_level;  // -1 until first use
Level detect_active_level();
}  // namespace detail

inline Level active_level() {
  const int level = detail::active_level.load(std::memory_order_relaxed);
  return level >= 0 ? static_cast<Level>(level) : detail::detect_active_level();
}

}  // namespace cpu
}  // namespace tallytrain
