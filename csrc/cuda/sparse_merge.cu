// sparse_merge on CUDA: out[indices[p]] += values[p] (* scale[p]) for peers
// p = 0, 1, ... in order (docs/design.md §3).
//
// Each peer's indices are unique (strictly increasing, checked first), so
// one launch per peer is a race-free scatter, and launches on one stream run
// in peer order: the sum is formed in exactly the reference's order, with no
// float atomics. The product and the sum are rounded separately (no fused
// multiply-add), as in the reference's `val.to(dtype) * scale` then
// `index_add_`.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "launchers.h"
#include "tallytrain/common.h"

namespace tallytrain {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    validate_kernel(const IndexList* __restrict__ lists, int64_t size, int* __restrict__ flags) {
  const int64_t p = blockIdx.y;
  const IndexList list = lists[p];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < list.length;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t v = list.indices[i];
    if ((i == 0 && v < 0) || (i == list.length - 1 && v >= size)) atomicOr(flags + 2 * p, 1);
    if (i > 0 && v <= list.indices[i - 1]) atomicOr(flags + 2 * p + 1, 1);
  }
}

// The value as the output dtype, like Tensor.to(dtype).
template <typename V, typename O>
__device__ __forceinline__ O convert(V v);
template <>
__device__ __forceinline__ float convert<float, float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float convert<double, float>(double v) {
  return __double2float_rn(v);
}
template <>
__device__ __forceinline__ float convert<__half, float>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float convert<uint16_t, float>(uint16_t v) {  // bfloat16 bits
  return __uint_as_float(static_cast<uint32_t>(v) << 16);
}
template <>
__device__ __forceinline__ double convert<float, double>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double convert<double, double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ double convert<__half, double>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ double convert<uint16_t, double>(uint16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v) << 16);
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename V, typename O, bool kScale>
__global__ void __launch_bounds__(kThreads)
    merge_peer_kernel(const int64_t* __restrict__ indices, const V* __restrict__ values,
                      int64_t length, O scale, O* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < length;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    O contrib = convert<V, O>(values[i]);
    if (kScale) contrib = mul_rn(contrib, scale);
    const int64_t j = indices[i];
    out[j] = add_rn(out[j], contrib);
  }
}

template <typename V, typename O>
cudaError_t launch_merge(const MergePeerArgs& a, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((a.length + kThreads - 1) / kThreads, 65535);
  const V* values = static_cast<const V*>(a.values);
  O* out = static_cast<O*>(a.out);
  // torch multiplies a float32 tensor by a Python float in float32.
  const O scale = static_cast<O>(a.scale);
  if (a.has_scale)
    merge_peer_kernel<V, O, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a.indices, values, a.length, scale, out);
  else
    merge_peer_kernel<V, O, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a.indices, values, a.length, scale, out);
  return cudaGetLastError();
}

template <typename O>
cudaError_t launch_out(const MergePeerArgs& a, cudaStream_t stream) {
  switch (a.values_dtype) {
    case FloatType::kFloat32:
      return launch_merge<float, O>(a, stream);
    case FloatType::kFloat64:
      return launch_merge<double, O>(a, stream);
    case FloatType::kFloat16:
      return launch_merge<__half, O>(a, stream);
    case FloatType::kBFloat16:
      return launch_merge<uint16_t, O>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_sparse_merge_validate(const IndexList* lists, int64_t peers, int64_t size,
                                         int64_t max_length, int* flags, cudaStream_t stream) {
  if (peers == 0 || max_length == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((max_length + kThreads - 1) / kThreads, 4096);
  int64_t done = 0;
  while (done < peers) {  // gridDim.y is at most 65535
    const int64_t chunk = std::min<int64_t>(peers - done, 65535);
    validate_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(chunk)), kThreads,
                      0, stream>>>(lists + done, size, flags + 2 * done);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    done += chunk;
  }
  return cudaSuccess;
}

cudaError_t launch_sparse_merge_peer(const MergePeerArgs& args, cudaStream_t stream) {
  if (args.length == 0) return cudaSuccess;
  return args.out_dtype == FloatType::kFloat64 ? launch_out<double>(args, stream)
                                               : launch_out<float>(args, stream);
}

}  // namespace cuda
}  // namespace tallytrain
