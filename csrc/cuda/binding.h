// Helpers for the CUDA bindings (the .cpp files that register the kernels for
// the CUDA dispatch key): the argument checks shared with the CPU kernels
// (tallytrain/checks.h, the reference's wording), dtype mapping, the device workspace handed to
// the launchers, and the few device-runtime calls they make.
//
// Built with TALLYTRAIN_SIMT (tests/simt/build.py), the same bindings and
// kernels serve CPU tensors through the CUDA execution model of
// tests/simt/include/simt.h, registered as the ops of the `tallytrain_simt`
// namespace, so that the tests exercise them where no GPU is.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>
#ifndef TALLYTRAIN_SIMT
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "launchers.h"
#include "tallytrain/checks.h"
#include "tallytrain/registration.h"

namespace tallytrain {
namespace cuda {

#ifdef TALLYTRAIN_SIMT
#define TALLYTRAIN_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(tallytrain_simt, CPU, m)
#define TALLYTRAIN_CUDA_CHECK(expr)                                   \
  do {                                                                \
    const cudaError_t tallytrain_err_ = (expr);                       \
    TORCH_CHECK(tallytrain_err_ == cudaSuccess,                       \
                "CUDA error: ", cudaGetErrorString(tallytrain_err_)); \
  } while (0)
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_device(const c10::Device& d) { return d.is_cpu(); }
#else
// Registered with the CPU kernels, once the build is checked (registration.h).
#define TALLYTRAIN_CUDA_IMPL(m) TALLYTRAIN_IMPL(CUDA, m)
#define TALLYTRAIN_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline bool on_device(const c10::Device& d) { return d.is_cuda(); }
#endif

inline FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(t == at::kDouble, "unsupported floating dtype ", t);
  return FloatType::kFloat64;
}

inline IntType int_type(at::ScalarType t) {
  switch (t) {
    case at::kByte:
      return IntType::kUInt8;
    case at::kChar:
      return IntType::kInt8;
    case at::kShort:
      return IntType::kInt16;
    case at::kInt:
      return IntType::kInt32;
    default:
      break;
  }
  TORCH_CHECK_TYPE(t == at::kLong, "unsupported integer dtype ", t);
  return IntType::kInt64;
}

// Device memory for a launcher's temporaries: byte tensors from torch's
// caching allocator on the op's device, kept alive until the op returns. The
// allocator is stream-ordered, so memory freed then can only be reused by
// work queued after this op's kernels on the same stream.
class Workspace {
 public:
  explicit Workspace(c10::Device device) : device_(device) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  Allocator allocator() { return Allocator{this, &Workspace::allocate}; }

 private:
  static void* allocate(void* self, size_t bytes) {
    auto* ws = static_cast<Workspace*>(self);
    ws->held_.push_back(at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                                  at::TensorOptions().dtype(at::kByte).device(ws->device_)));
    return ws->held_.back().data_ptr();
  }
  c10::Device device_;
  std::vector<at::Tensor> held_;
};

// A one-element int64 flag on `device`, initialised to INT64_MAX, that the
// kernels lower (atomicMin) to the first bad position.
inline at::Tensor first_bad_flag(const at::Device& device) {
  return at::full({1}, std::numeric_limits<int64_t>::max(),
                  at::TensorOptions().dtype(at::kLong).device(device));
}

inline unsigned long long* flag_ptr(const at::Tensor& flag) {
  return reinterpret_cast<unsigned long long*>(flag.data_ptr<int64_t>());
}

// Reads the flag back (synchronising the stream): -1 if nothing was flagged.
inline int64_t read_first_bad(const at::Tensor& flag) {
  const int64_t v = flag.item<int64_t>();
  return v == std::numeric_limits<int64_t>::max() ? -1 : v;
}

}  // namespace cuda
}  // namespace tallytrain
