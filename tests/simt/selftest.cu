// Kernels that show what tests/simt's execution model (include/simt.h) does:
// warp collectives and barriers giving a GPU's results, and each programming
// error it reports instead of leaving undefined. Built by build.py's
// load_selftest(), driven by tests/ops/test_simt.py.
#include <cuda_runtime.h>
#include <stdint.h>

namespace selftest {

constexpr unsigned kFull = 0xffffffffu;

// Sum of each warp's 32 values, by an xor butterfly.
__global__ void warp_sums_kernel(const int* x, int* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  int v = x[i];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
  if ((threadIdx.x & 31) == 0) out[i / 32] = v;
}

// Inclusive prefix sums of each block of 256 values: a warp scan with
// __shfl_up_sync, then the warps' totals through shared memory.
__global__ void block_scan_kernel(const int* x, int* out) {
  __shared__ int warp_totals[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int i = blockIdx.x * 256 + threadIdx.x;
  int v = x[i];
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(kFull, v, d);
    if (lane >= d) v += u;
  }
  if (lane == 31) warp_totals[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp; ++w) v += warp_totals[w];
  out[i] = v;
}

// How many lanes of its warp hold each lane's value: the groups of
// __match_any_sync each reduce on their own (as tally.cu's vote count does).
__global__ void match_counts_kernel(const int* x, int* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned group = __match_any_sync(kFull, x[i]);
  out[i] = static_cast<int>(__reduce_add_sync(group, 1u));
}

// 64 KiB of dynamic shared memory: one instance is launched without raising
// its limit, the other after cudaFuncSetAttribute.
template <int kInstance>
__global__ void big_shared_kernel(int* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  smem[threadIdx.x] = static_cast<unsigned char>(threadIdx.x);
  out[threadIdx.x] = smem[threadIdx.x];
}

// What each block first finds in a static and a dynamic shared array, before
// writing them (so that a later block would see the writes if shared memory
// carried over): out[block][0][thread] and out[block][1][thread].
__global__ void read_fresh_shared_kernel(uint32_t* out) {
  __shared__ uint32_t fixed[32];
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* dynamic = reinterpret_cast<uint32_t*>(smem);
  uint32_t* mine = out + blockIdx.x * 2 * blockDim.x;
  mine[threadIdx.x] = fixed[threadIdx.x];
  mine[blockDim.x + threadIdx.x] = dynamic[threadIdx.x];
  __syncthreads();
  fixed[threadIdx.x] = dynamic[threadIdx.x] = 7;
}

// Each lane's results of the shuffles at width 8 and a ballot:
// out[5 * lane + k] for __shfl_sync(src 3), __shfl_up_sync(2),
// __shfl_down_sync(2), __shfl_xor_sync(5), __ballot_sync(x > 0); any/all
// over x > 0 in out[160], out[161].
__global__ void shuffle_widths_kernel(const int* x, int* out) {
  const int lane = threadIdx.x;
  const int v = x[lane];
  out[5 * lane + 0] = __shfl_sync(kFull, v, 3, 8);
  out[5 * lane + 1] = __shfl_up_sync(kFull, v, 2, 8);
  out[5 * lane + 2] = __shfl_down_sync(kFull, v, 2, 8);
  out[5 * lane + 3] = __shfl_xor_sync(kFull, v, 5, 8);
  out[5 * lane + 4] = static_cast<int>(__ballot_sync(kFull, v > 0));
  const int any = __any_sync(kFull, v > 0), all = __all_sync(kFull, v > 0);
  if (lane == 0) {
    out[160] = any;
    out[161] = all;
  }
}

// Thread 1 reads what thread 0 wrote without a barrier between: right only
// when thread 0 happens to run first. out[block] = what thread 1 read.
__global__ void order_dependent_kernel(int* out) {
  __shared__ int cell;
  if (threadIdx.x == 0) cell = 1;
  if (threadIdx.x == 1) out[blockIdx.x] = cell;
}

template <int kBound>
__global__ void __launch_bounds__(kBound) bounded_kernel(int* out) {
  out[threadIdx.x] = 1;
}

// Sums x[0..n]: one element past the end, which only the AddressSanitizer
// build can see.
__global__ void sum_past_end_kernel(const int* x, int n, int* out) {
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int i = 0; i <= n; ++i) sum += x[i];
    *out = sum;
  }
}

enum Fault {
  kBarrierAgainstShuffle = 0,  // lane 0 at __syncthreads, its warp in a shuffle
  kExitedLane = 1,             // lane 31 returns, the others shuffle with it
  kShuffleOutsideMask = 2,     // lanes 0-15 read lanes 16-31 with mask 0xffff
  kCallerNotInMask = 3,        // lane 0 names only lane 1 in its mask
  kSpinForever = 4,            // waits on a flag nobody sets
  kWaitForLaterBlock = 5,      // block 0 waits on block 1
  kTooMuchSharedMemory = 6,    // 64 KiB without cudaFuncSetAttribute
  kTooManyThreads = 7,         // 2048 threads per block
  kSharedMemoryAttribute = 8,  // 64 KiB after cudaFuncSetAttribute: runs
  kBarrierAfterExit = 9,       // threads 16-31 return, 0-15 wait at __syncthreads
  kMixedShuffles = 10,         // lanes 0-15 in __shfl_xor_sync, 16-31 in __shfl_down_sync
  kOverLaunchBounds = 11,      // 128 threads for __launch_bounds__(64)
  kErrorAfterFault = 12,       // a bad cudaFuncSetAttribute after a kernel fault
};

__global__ void fault_kernel(int which, int* flag, int* out) {
  const int lane = threadIdx.x & 31;
  switch (which) {
    case kBarrierAgainstShuffle:
      if (threadIdx.x == 0)
        __syncthreads();
      else
        out[threadIdx.x] = __shfl_xor_sync(kFull, lane, 1);
      break;
    case kExitedLane:
      if (lane == 31) return;
      out[threadIdx.x] = __shfl_xor_sync(kFull, lane, 1);
      break;
    case kShuffleOutsideMask:
      if (lane < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, lane, 16);
      break;
    case kCallerNotInMask:
      out[threadIdx.x] = __shfl_xor_sync(lane == 0 ? 0x2u : kFull, lane, 1);
      break;
    case kSpinForever:
      while (atomicAdd(flag, 0) == 0) __nanosleep(100);
      break;
    case kWaitForLaterBlock:
      if (blockIdx.x == 0)
        while (atomicAdd(flag, 0) == 0) __nanosleep(100);
      else
        atomicAdd(flag, 1);
      break;
    case kBarrierAfterExit:
      if (threadIdx.x >= 16) return;
      __syncthreads();
      break;
    case kMixedShuffles:
      out[threadIdx.x] =
          lane < 16 ? __shfl_xor_sync(kFull, lane, 1) : __shfl_down_sync(kFull, lane, 1);
      break;
    default:
      out[threadIdx.x] = lane;
  }
}

cudaError_t launch_warp_sums(const int* x, int n, int* out) {
  warp_sums_kernel<<<n / 64, 64>>>(x, out);
  return cudaGetLastError();
}
cudaError_t launch_block_scan(const int* x, int n, int* out) {
  block_scan_kernel<<<n / 256, 256>>>(x, out);
  return cudaGetLastError();
}
cudaError_t launch_match_counts(const int* x, int n, int* out) {
  match_counts_kernel<<<n / 32, 32>>>(x, out);
  return cudaGetLastError();
}
cudaError_t launch_sum_past_end(const int* x, int n, int* out) {
  sum_past_end_kernel<<<1, 32>>>(x, n, out);
  return cudaGetLastError();
}
cudaError_t launch_read_fresh_shared(uint32_t* out, int blocks) {
  read_fresh_shared_kernel<<<blocks, 32, 32 * sizeof(uint32_t)>>>(out);
  return cudaGetLastError();
}
cudaError_t launch_shuffle_widths(const int* x, int, int* out) {
  shuffle_widths_kernel<<<1, 32>>>(x, out);
  return cudaGetLastError();
}
cudaError_t launch_order_dependent(const int*, int blocks, int* out) {
  order_dependent_kernel<<<blocks, 32>>>(out);
  return cudaGetLastError();
}
cudaError_t launch_fault(int which, int* flag, int* out) {
  constexpr size_t kBig = 64 << 10;
  if (which == kTooMuchSharedMemory) {
    big_shared_kernel<0><<<1, 32, kBig>>>(out);
  } else if (which == kSharedMemoryAttribute) {
    const cudaError_t err = cudaFuncSetAttribute(
        big_shared_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kBig));
    if (err != cudaSuccess) return err;
    big_shared_kernel<1><<<1, 32, kBig>>>(out);
  } else if (which == kOverLaunchBounds) {
    bounded_kernel<64><<<1, 128>>>(out);
  } else if (which == kErrorAfterFault) {
    fault_kernel<<<1, 32>>>(kBarrierAgainstShuffle, flag, out);
    cudaGetLastError();  // the fault, consumed
    return cudaFuncSetAttribute(big_shared_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                1 << 30);
  } else {
    const unsigned blocks = which == kWaitForLaterBlock ? 2 : 1;
    const unsigned threads = which == kTooManyThreads ? 2048 : 32;
    fault_kernel<<<blocks, threads>>>(which, flag, out);
  }
  return cudaGetLastError();
}

}  // namespace selftest
