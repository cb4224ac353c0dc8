// The CUDA kernels' C-style entry points. The .cu files implement them with
// CUDA headers only; the .cpp bindings call them with raw pointers taken from
// checked torch tensors, so no torch header is compiled by nvcc.
//
// Every launcher enqueues its work on `stream` and returns the first CUDA
// error it met (cudaSuccess otherwise). Launchers that need temporary device
// memory take an Allocator: the memory it returns must stay valid until the
// op returns, and may be reused by later work on the same stream (torch's
// caching allocator gives exactly that).
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace tallytrain {
namespace cuda {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum class IntType : int { kUInt8 = 0, kInt8 = 1, kInt16 = 2, kInt32 = 3, kInt64 = 4 };

struct Allocator {
  void* context;
  void* (*allocate)(void* context, size_t bytes);
  void* operator()(size_t bytes) const { return allocate(context, bytes); }
};

// ---- pack_argmax ----------------------------------------------------------
struct PackArgmaxArgs {
  const void* logits;  // [rows, cols] contiguous
  FloatType dtype;     // kFloat32, kFloat16 or kBFloat16
  int64_t rows;
  int64_t cols;  // 2 <= cols < 2**32
  bool abstain;  // rows whose prob is not >= abstain_below emit symbol `cols`
  float abstain_below;
  int bits;      // bits_for(cols) or bits_for(cols + 1) with abstain
  uint8_t* out;  // ceil(rows * bits / 8) bytes, 4-byte aligned
  int64_t out_bytes;
  float* prob;  // [rows] top-1 probabilities, or nullptr when not needed
};
cudaError_t launch_pack_argmax(const PackArgmaxArgs& args, const Allocator& alloc,
                               cudaStream_t stream);

// ---- pack_labels / unpack_labels -------------------------------------------
// Out-of-range labels or symbols lower *first_bad (initialised by the caller
// to INT64_MAX) to the smallest offending position.
struct PackLabelsArgs {
  const void* labels;  // [n] contiguous
  IntType dtype;
  int64_t n;
  int64_t num_symbols;
  int bits;
  uint8_t* out;  // ceil(n * bits / 8) bytes, 4-byte aligned
  int64_t out_bytes;
  unsigned long long* first_bad;
};
cudaError_t launch_pack_labels(const PackLabelsArgs& args, cudaStream_t stream);

struct UnpackLabelsArgs {
  const uint8_t* packed;  // exactly ceil(n * bits / 8) bytes
  int64_t n;
  int64_t num_symbols;
  int bits;
  int64_t* out;                   // [n]
  unsigned long long* first_bad;  // may be nullptr when num_symbols is a power of two
};
cudaError_t launch_unpack_labels(const UnpackLabelsArgs& args, cudaStream_t stream);

// ---- tally -----------------------------------------------------------------
struct TallyArgs {
  const uint8_t* votes;  // P rows of row_bytes = ceil(n * bits / 8) bytes each
  int64_t peers;
  int64_t n;
  int64_t num_classes;
  bool abstain;  // symbol num_classes is an abstention
  int bits;
  int64_t num_symbols;     // num_classes (+ 1 with abstain)
  const int64_t* weights;  // [peers] on the device, each >= 0; nullptr: all 1
  bool wide_counts;        // the summed weight may exceed INT32_MAX
  int64_t* label;
  int64_t* count;
  int64_t* total;
  int64_t* runner_up;
  unsigned long long* first_bad;  // smallest p * n + i holding a symbol >= num_symbols
};
cudaError_t launch_tally(const TallyArgs& args, const Allocator& alloc, cudaStream_t stream);

// ---- topk_sparse / topk_sparse_ef -------------------------------------------
struct TopkArgs {
  FloatType dtype;
  const void* x;   // [m] contiguous
  void* residual;  // [m] contiguous, updated in place; nullptr for plain top-k
  int64_t m;
  int64_t k;             // 0 <= k <= m
  int64_t* out_indices;  // [k]
  void* out_values;      // [k] of dtype
};
// Synchronises `stream` once (to size the exact selection). On return,
// *nan_index is the first index whose (x + residual) is NaN, or -1; with a
// NaN the outputs are unspecified and residual is left unchanged.
cudaError_t launch_topk(const TopkArgs& args, const Allocator& alloc, cudaStream_t stream,
                        int64_t* nan_index);

// ---- sparse_merge -----------------------------------------------------------
// Flags peer p's list: flags[2p] = 1 if indices[0] < 0 or indices[len-1] >=
// size, flags[2p+1] = 1 if the list is not strictly increasing. `flags` holds
// 2 * peers zeroed ints; `lists` is a device array of {pointer, length} pairs.
struct IndexList {
  const int64_t* indices;
  int64_t length;
};
cudaError_t launch_sparse_merge_validate(const IndexList* lists, int64_t peers, int64_t size,
                                         int64_t max_length, int* flags, cudaStream_t stream);

// out[indices[i]] += float(values[i]) (* scale when has_scale), in the output
// dtype, rounding the product before the sum like the reference. Indices must
// be validated (in range, strictly increasing) first.
struct MergePeerArgs {
  const int64_t* indices;
  const void* values;
  FloatType values_dtype;
  int64_t length;
  bool has_scale;
  double scale;
  void* out;
  FloatType out_dtype;  // kFloat32 or kFloat64
};
cudaError_t launch_sparse_merge_peer(const MergePeerArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tallytrain
