// Helpers for the CPU kernel files: the argument checks shared with the CUDA
// bindings (tallytrain/checks.h), the first-bad-position record of parallel
// validation, and the bit writer of packed streams.
#pragma once
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "tallytrain/checks.h"
#include "tallytrain/registration.h"

namespace tallytrain {
namespace cpu {

// Lowers `first` to `position` unless it already holds a smaller one: how
// threads that validate parts of an input agree on the first bad position.
inline void record_first(std::atomic<int64_t>& first, int64_t position) {
  int64_t cur = first.load(std::memory_order_relaxed);
  while (position < cur && !first.compare_exchange_weak(cur, position)) {}
}

// Appends b-bit symbols to a byte stream, least significant bit first, through
// a 64-bit accumulator. `out` must start on a byte boundary of the stream.
struct BitWriter {
  uint8_t* out;
  uint64_t acc = 0;
  int fill = 0;
  explicit BitWriter(uint8_t* dst) : out(dst) {}
  inline void put(uint64_t symbol, int b) {
    acc |= symbol << fill;
    fill += b;
    if (fill >= 32) {
      for (int k = 0; k < 4; ++k) *out++ = static_cast<uint8_t>(acc >> (8 * k));
      acc >>= 32;
      fill -= 32;
    }
  }
  // Writes the remaining bits; the unused high bits of the last byte are zero.
  inline void flush() {
    while (fill > 0) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      fill -= 8;
    }
    fill = 0;
  }
};

}  // namespace cpu
}  // namespace tallytrain
