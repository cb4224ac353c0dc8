// The argument checks of every op, shared by the CPU kernels (csrc/cpu) and
// the CUDA bindings (csrc/cuda/*_binding.cpp), so that both raise the
// reference's errors in the reference's words: TypeError for a wrong dtype
// (TORCH_CHECK_TYPE), ValueError for anything else (TORCH_CHECK_VALUE), each
// message naming the argument. Checks that read tensor data take it from the
// host (weights and counts are P numbers); per-element checks of large inputs
// (symbols, indices) stay with each device's kernel, which reports through
// the failure messages below.
//
// Host-only: uses torch headers, unlike common.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tallytrain/common.h"

namespace tallytrain {

inline bool is_integer_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// The dtypes of top-k inputs and of sparse values.
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A double as Python's repr writes it (shortest round trip, "2.0" not "2"), so
// that error messages read as the reference's.
inline std::string python_float(double v) {
  char buf[32];
  std::string s(buf, std::to_chars(buf, buf + sizeof(buf), v).ptr);
  if (s.find_first_of(".eni") == std::string::npos) s += ".0";
  return s;
}

// Returns the symbol width.
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

// ---- pack_argmax, pack_labels, unpack_labels ------------------------------- //

// Returns the symbol width (bits_for(C), or bits_for(C + 1) with abstention).
inline int check_pack_argmax_args(const at::Tensor& logits,
                                  const std::optional<double>& abstain_below) {
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, C], got shape ", logits.sizes());
  const int64_t cols = logits.size(1);
  TORCH_CHECK_VALUE(cols >= 2, "logits must have C >= 2 classes, got C=", cols);
  TORCH_CHECK_VALUE(cols < (int64_t(1) << 32), "logits must have C < 2**32 classes, got C=", cols);
  if (abstain_below.has_value()) {
    const double t = *abstain_below;
    TORCH_CHECK_VALUE(t >= 0.0 && t <= 1.0, "abstain_below must be in [0, 1], got ",
                      python_float(t));
  }
  return bits_for(abstain_below.has_value() ? cols + 1 : cols);
}

// Returns the symbol width. The values are checked by the kernels.
inline int check_pack_labels_args(const at::Tensor& labels, int64_t num_symbols) {
  TORCH_CHECK_TYPE(is_integer_dtype(labels.scalar_type()), "labels must be an integer tensor, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1, "labels must be 1-D [N], got shape ", labels.sizes());
  return check_num_symbols(num_symbols);
}

[[noreturn]] inline void fail_label_out_of_range(int64_t position, int64_t label,
                                                 int64_t num_symbols) {
  TORCH_CHECK_VALUE(false, "labels[", position, "] = ", label, " is outside 0..", num_symbols - 1,
                    " (num_symbols=", num_symbols, ")");
  __builtin_unreachable();
}

// Returns the symbol width.
inline int check_unpack_args(const at::Tensor& packed, int64_t n, int64_t num_symbols) {
  TORCH_CHECK_VALUE(packed.dim() == 1, "packed must be 1-D, got shape ", packed.sizes());
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be a uint8 tensor, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int b = check_num_symbols(num_symbols);
  check_stream_bytes(packed.size(0), n, b, "packed");
  return b;
}

// A stream (`name`: packed, votes) holding a symbol >= num_symbols at flat
// position `position`.
[[noreturn]] inline void fail_symbol_out_of_range(const char* name, int64_t symbol,
                                                  int64_t position, int64_t num_symbols) {
  TORCH_CHECK_VALUE(false, name, " holds symbol ", symbol, " at position ", position,
                    ", outside 0..", num_symbols - 1);
  __builtin_unreachable();
}

// ---- tally ------------------------------------------------------------------ //

// Returns the symbol width (with abstention, C + 1 symbols).
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

struct TallyWeights {
  at::Tensor host;   // int64 [P], contiguous, on the CPU; undefined without weights
  uint64_t sum = 0;  // their sum (P without weights), saturated at UINT64_MAX
};

inline TallyWeights check_tally_weights(const std::optional<at::Tensor>& weights, int64_t peers) {
  TallyWeights w;
  if (!weights.has_value()) {
    w.sum = static_cast<uint64_t>(peers);
    return w;
  }
  TORCH_CHECK_TYPE(is_integer_dtype(weights->scalar_type()),
                   "weights must be an integer tensor, got ", weights->scalar_type());
  TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == peers,
                    "weights must be 1-D with one entry per peer (", peers, "), got shape ",
                    weights->sizes());
  w.host = weights->to(at::kCPU, at::kLong).contiguous();
  const int64_t* wp = w.host.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < peers; ++p) {
    TORCH_CHECK_VALUE(wp[p] >= 0, "weights must be >= 0, got weights[", p, "] = ", wp[p]);
    const uint64_t add = static_cast<uint64_t>(wp[p]);
    w.sum = add > UINT64_MAX - w.sum ? UINT64_MAX : w.sum + add;
  }
  return w;
}

// ---- topk_sparse, topk_sparse_ef ------------------------------------------------ //

inline void check_topk_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1, "x must be 1-D [M], got shape ", x.sizes());
  TORCH_CHECK_VALUE(0 <= k && k <= x.numel(), "k must satisfy 0 <= k <= M = ", x.numel(), ", got ",
                    k);
}

inline void check_topk_ef_args(const at::Tensor& x, const at::Tensor& residual, int64_t k) {
  check_topk_input(x, k);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
                        residual.device() == x.device(),
                    "residual must match x in shape, dtype and device: x is ", x.sizes(), " ",
                    x.scalar_type(), " ", x.device(), ", residual is ", residual.sizes(), " ",
                    residual.scalar_type(), " ", residual.device());
}

// ---- sparse_merge ---------------------------------------------------------------- //

// The lists and the size; returns the per-peer scales: 1 for a sum, or
// counts[p] / sum(counts) for an average. The sum is exact (128-bit), like
// the reference's Python ints: P counts below 2**63 each cannot wrap it.
// The scales are the reference's doubles whenever the sum is below 2**53.
inline std::vector<double> check_merge_args(at::TensorList indices, at::TensorList values,
                                            int64_t size, const std::optional<at::Tensor>& counts) {
  TORCH_CHECK_VALUE(indices.size() == values.size(),
                    "indices and values must list the same number of peers, got ", indices.size(),
                    " and ", values.size());
  TORCH_CHECK_VALUE(size >= 0, "size must be >= 0, got ", size);
  const int64_t peers = static_cast<int64_t>(indices.size());
  std::vector<double> scales(peers, 1.0);
  if (!counts.has_value()) return scales;
  TORCH_CHECK_TYPE(is_integer_dtype(counts->scalar_type()),
                   "counts must be an integer tensor, got ", counts->scalar_type());
  TORCH_CHECK_VALUE(counts->dim() == 1 && counts->size(0) == peers,
                    "counts must be 1-D with one entry per peer (", peers, "), got shape ",
                    counts->sizes());
  const at::Tensor host = counts->to(at::kCPU, at::kLong).contiguous();
  const int64_t* cp = host.const_data_ptr<int64_t>();
  __int128 sum = 0;
  for (int64_t p = 0; p < peers; ++p) {
    TORCH_CHECK_VALUE(cp[p] >= 0, "counts must be >= 0, got counts[", p, "] = ", cp[p]);
    sum += cp[p];
  }
  TORCH_CHECK_VALUE(peers == 0 || sum > 0, "counts must sum to a positive number");
  const double total = static_cast<double>(sum);
  for (int64_t p = 0; p < peers; ++p) scales[p] = static_cast<double>(cp[p]) / total;
  return scales;
}

// A check of one peer that failed: TypeError or ValueError, and the message.
struct PeerError {
  bool type_error;
  std::string message;
  [[noreturn]] void raise() const {
    TORCH_CHECK_TYPE(!type_error, message);
    TORCH_CHECK_VALUE(false, message);
    __builtin_unreachable();
  }
};

// The checks of peer p that need no data (dtypes and shapes), in the
// reference's order; the CUDA binding raises them after checking the
// earlier peers' indices on the device.
inline std::optional<PeerError> merge_peer_shape_error(const at::Tensor& idx, const at::Tensor& val,
                                                       int64_t p) {
  if (idx.scalar_type() != at::kLong)
    return PeerError{true, c10::str("indices[", p, "] must be int64, got ", idx.scalar_type())};
  if (!is_float_dtype(val.scalar_type()))
    return PeerError{
        true, c10::str("values[", p, "] must be a floating tensor, got ", val.scalar_type())};
  if (idx.dim() != 1 || val.dim() != 1 || idx.sizes() != val.sizes())
    return PeerError{
        false, c10::str("indices[", p, "] and values[", p, "] must be 1-D of equal length, got ",
                        idx.sizes(), " and ", val.sizes())};
  return std::nullopt;
}

[[noreturn]] inline void fail_indices_out_of_range(int64_t p, int64_t size, int64_t lowest,
                                                   int64_t highest) {
  TORCH_CHECK_VALUE(false, "indices[", p, "] must lie in 0..size-1 = ", size - 1, ", got ", lowest,
                    "..", highest);
  __builtin_unreachable();
}

[[noreturn]] inline void fail_indices_not_increasing(int64_t p) {
  TORCH_CHECK_VALUE(false, "indices[", p, "] must be strictly increasing");
  __builtin_unreachable();
}

}  // namespace tallytrain
