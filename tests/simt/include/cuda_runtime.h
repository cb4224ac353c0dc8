// The CUDA runtime calls the kernels' launchers make, for tests/simt (see
// simt.h): device memory is host memory, every stream is the calling thread,
// and the device is an H100-like part with a small SM count (so that
// persistent grids still span several blocks).
#pragma once
#include <string.h>

#include <algorithm>

#include "simt.h"

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

namespace simt {
constexpr int kMultiProcessors = 4;
constexpr int kSharedPerMultiprocessor = 228 * 1024;
constexpr int kThreadsPerMultiprocessor = 2048;
}  // namespace simt

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::simt::last_error;
  ::simt::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::simt::last_error; }
// The model's description of the last failed launch where `e` is its error,
// else the runtime's generic text.
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (e == ::simt::last_message_error) return ::simt::last_message.c_str();
  switch (e) {
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = ::simt::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(::simt::kDefaultDynamicShared);
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = ::simt::kMultiProcessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = ::simt::kSharedPerMultiprocessor;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(::simt::kMaxDynamicShared);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::simt::kMaxDynamicShared)
    return cudaErrorInvalidValue;
  ::simt::max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F*, int block_size,
                                                          size_t dynamic_shared) {
  if (block_size <= 0 || block_size > ::simt::kMaxThreadsPerBlock) return cudaErrorInvalidValue;
  int n = ::simt::kThreadsPerMultiprocessor / block_size;
  if (dynamic_shared > 0)
    n = std::min<int>(n, static_cast<int>(::simt::kSharedPerMultiprocessor / dynamic_shared));
  *blocks = std::min(n, 32);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  memmove(dst, src, bytes);
  return cudaSuccess;
}
// Kernels run when launched, so a stream is always drained; what is left to
// report is a kernel's fault (sticky, as on a device).
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return ::simt::last_error; }
inline cudaError_t cudaDeviceSynchronize() { return ::simt::last_error; }
