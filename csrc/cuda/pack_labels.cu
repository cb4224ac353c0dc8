// pack_labels and unpack_labels on CUDA (docs/design.md §2).
//
// pack: a block of 256 threads owns 256 consecutive labels, i.e. 8 groups of
// 32 symbols = 8 * b whole 32-bit words of the stream, so blocks write
// disjoint words without atomics. unpack: one thread per symbol, reading
// only the bytes that hold it. Out-of-range values are reported through a
// device flag (atomicMin of the position), which the binding reads back.
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"
#include "tallytrain/common.h"

namespace tallytrain {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pack_labels_kernel(const T* __restrict__ labels, int64_t n, int64_t num_symbols, int b,
                       uint8_t* __restrict__ out, int64_t out_bytes,
                       unsigned long long* __restrict__ first_bad) {
  __shared__ uint32_t sym[kThreads];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t i = row0 + threadIdx.x;
  uint32_t s = 0;  // rows past the end pack as zero bits
  if (i < n) {
    const int64_t v = static_cast<int64_t>(labels[i]);
    if (v < 0 || v >= num_symbols) {
      atomicMin(first_bad, static_cast<unsigned long long>(i));
    } else {
      s = static_cast<uint32_t>(v);
    }
  }
  sym[threadIdx.x] = s;
  __syncthreads();
  const int words = (kThreads / 32) * b;
  const int64_t word0 = (row0 / 32) * b;
  for (int t = threadIdx.x; t < words; t += kThreads) {
    const int group = t / b;
    store_stream_word(out, out_bytes, word0 + t, pack_word32(sym + 32 * group, b, t - group * b));
  }
}

__global__ void __launch_bounds__(kThreads)
    unpack_labels_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t num_symbols, int b,
                         int64_t* __restrict__ out, unsigned long long* __restrict__ first_bad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const uint32_t s = read_symbol_exact(packed, i, b);
  if (static_cast<int64_t>(s) >= num_symbols)
    atomicMin(first_bad, static_cast<unsigned long long>(i));
  out[i] = static_cast<int64_t>(s);
}

template <typename T>
cudaError_t launch_pack(const PackLabelsArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.n + kThreads - 1) / kThreads;
  pack_labels_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.labels), a.n, a.num_symbols, a.bits, a.out, a.out_bytes, a.first_bad);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack_labels(const PackLabelsArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  switch (args.dtype) {
    case IntType::kUInt8:
      return launch_pack<uint8_t>(args, stream);
    case IntType::kInt8:
      return launch_pack<int8_t>(args, stream);
    case IntType::kInt16:
      return launch_pack<int16_t>(args, stream);
    case IntType::kInt32:
      return launch_pack<int32_t>(args, stream);
    case IntType::kInt64:
      return launch_pack<int64_t>(args, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_unpack_labels(const UnpackLabelsArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  const int64_t blocks = (args.n + kThreads - 1) / kThreads;
  unpack_labels_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      args.packed, args.n, args.num_symbols, args.bits, args.out, args.first_bad);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tallytrain
