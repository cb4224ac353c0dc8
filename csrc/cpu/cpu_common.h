// Helpers for the CPU kernel files: argument checks whose messages name the
// argument (raised as Python ValueError / TypeError), and the bit writer of
// packed streams.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <charconv>
#include <optional>
#include <string>

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

// A double as Python's repr writes it (shortest round trip, "2.0" not "2"), so
// that error messages read as the reference's.
inline std::string python_float(double v) {
  char buf[32];
  std::string s(buf, std::to_chars(buf, buf + sizeof(buf), v).ptr);
  if (s.find_first_of(".eni") == std::string::npos) s += ".0";
  return s;
}

// The argument checks of each op, shared by its CPU kernel and its CUDA
// binding so that both raise the reference's errors.

// pack_argmax: returns the symbol width (bits_for(C), or bits_for(C + 1) with
// abstention).
inline int check_pack_argmax_args(const at::Tensor& logits,
                                  const std::optional<double>& abstain_below) {
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, C], got shape ", logits.sizes());
  const int64_t cols = logits.size(1);
  TORCH_CHECK_VALUE(cols >= 2, "logits must have C >= 2 classes, got C=", cols);
  TORCH_CHECK_VALUE(cols < (int64_t(1) << 32), "logits must have C < 2**32 classes, got C=",
                    cols);
  if (abstain_below.has_value()) {
    const double t = *abstain_below;
    TORCH_CHECK_VALUE(t >= 0.0 && t <= 1.0, "abstain_below must be in [0, 1], got ",
                      python_float(t));
  }
  return bits_for(abstain_below.has_value() ? cols + 1 : cols);
}

// unpack_labels: returns the symbol width.
inline int check_unpack_args(const at::Tensor& packed, int64_t n, int64_t num_symbols) {
  TORCH_CHECK_VALUE(packed.dim() == 1, "packed must be 1-D, got shape ", packed.sizes());
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be a uint8 tensor, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int b = check_num_symbols(num_symbols);
  check_stream_bytes(packed.size(0), n, b, "packed");
  return b;
}

// tally's votes: returns the symbol width (with abstention, C + 1 symbols).
inline int check_tally_votes(const at::Tensor& votes, int64_t n, int64_t num_classes,
                             bool abstain) {
  TORCH_CHECK_VALUE(votes.dim() == 2, "votes must be 2-D [P, bytes], got shape ", votes.sizes());
  TORCH_CHECK_VALUE(num_classes >= 2, "num_classes must be >= 2, got ", num_classes);
  TORCH_CHECK_TYPE(votes.scalar_type() == at::kByte, "votes must be a uint8 tensor, got ",
                   votes.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int b = check_num_symbols(abstain ? num_classes + 1 : num_classes);
  check_stream_bytes(votes.size(1), n, b, "votes");
  return b;
}

// sparse_merge: the lists, the size and the shape of counts (their values
// are checked where they are summed).
inline void check_merge_args(at::TensorList indices, at::TensorList values, int64_t size,
                             const std::optional<at::Tensor>& counts) {
  TORCH_CHECK_VALUE(indices.size() == values.size(),
                    "indices and values must list the same number of peers, got ",
                    indices.size(), " and ", values.size());
  TORCH_CHECK_VALUE(size >= 0, "size must be >= 0, got ", size);
  if (counts.has_value()) {
    const int64_t peers = static_cast<int64_t>(indices.size());
    TORCH_CHECK_TYPE(is_integer_dtype(counts->scalar_type()),
                     "counts must be an integer tensor, got ", counts->scalar_type());
    TORCH_CHECK_VALUE(counts->dim() == 1 && counts->size(0) == peers,
                      "counts must be 1-D with one entry per peer (", peers, "), got shape ",
                      counts->sizes());
  }
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
