// Helpers for the CPU kernel files: argument checks whose messages name the
// argument (raised as Python ValueError / TypeError), and the bit writer of
// packed streams.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "tallytrain/common.h"

namespace tallytrain {
namespace cpu {

inline bool is_integer_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

inline int check_num_symbols(int64_t num_symbols, const char* name = "num_symbols") {
  TORCH_CHECK_VALUE(num_symbols >= 2, name, " must be >= 2, got ", num_symbols);
  TORCH_CHECK_VALUE(num_symbols <= (int64_t(1) << 32), name, " must be <= 2**32, got ",
                    num_symbols);
  return bits_for(num_symbols);
}

// A packed stream of n symbols of b bits must hold exactly ceil(n*b/8) bytes.
inline void check_stream_bytes(int64_t have, int64_t n, int b, const char* name) {
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int64_t need = packed_bytes(n, b);
  TORCH_CHECK_VALUE(have == need, name, " must hold exactly ceil(n*bits/8) = ", need,
                    " bytes for n=", n, " symbols of ", b, " bits, got ", have);
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
