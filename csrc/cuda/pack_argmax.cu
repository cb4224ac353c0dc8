// pack_argmax on CUDA: each row's argmax (torch.argmax semantics), optionally
// its top-1 softmax probability and abstention, packed into the b-bit stream
// of docs/design.md §2 in one pass over the logits.
//
// Three regimes by row size:
// - rows of at most 512 bytes: a block stages 256/T whole rows at a time
//   through shared memory with 16-byte loads (the rows x C block is one flat
//   stream) and T threads (1, 2 or 4) reduce each row;
// - larger rows: one warp per row, 16-byte loads with a scalar head and tail
//   (rows are not 16-byte aligned in general);
// - few rows of huge C: each row is split over several blocks; a second
//   kernel combines the partial results in chunk order.
// Every reduction compares (key, index) pairs under a total order (larger
// key first, then smaller index), so the result does not depend on which
// thread saw which element. A block always owns whole groups of 32 rows,
// and 32 rows x b bits are exactly b 32-bit words, so blocks write disjoint
// words and no atomics are needed.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "launchers.h"
#include "tallytrain/common.h"

namespace tallytrain {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Longer rows go a warp each: a block owns 256 rows and stages them T tiles
// after one another, which would leave too few blocks for moderate N.
constexpr int64_t kStagedMaxRowBytes = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per lane

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- element types ---------------------------------------------------------
struct F32 {
  using Bits = uint32_t;
  static constexpr uint32_t kNanKey = 0xffffffffu;
  __device__ static uint32_t key(Bits u) { return key_f32(u); }
  __device__ static float value(Bits u) { return __uint_as_float(u); }
};
struct F16 {
  using Bits = uint16_t;
  static constexpr uint32_t kNanKey = 0xffffu;
  __device__ static uint32_t key(Bits u) { return key_f16bits(u, kHalfExpMask); }
  __device__ static float value(Bits u) { return __half2float(__ushort_as_half(u)); }
};
struct BF16 {
  using Bits = uint16_t;
  static constexpr uint32_t kNanKey = 0xffffu;
  __device__ static uint32_t key(Bits u) { return key_f16bits(u, kBFloat16ExpMask); }
  __device__ static float value(Bits u) { return __uint_as_float(static_cast<uint32_t>(u) << 16); }
};

// Element t of a 16-byte vector (little-endian lanes).
template <class Bits>
__device__ __forceinline__ Bits vec_elem(const uint4& v, int t);
template <>
__device__ __forceinline__ uint32_t vec_elem<uint32_t>(const uint4& v, int t) {
  return t == 0 ? v.x : t == 1 ? v.y : t == 2 ? v.z : v.w;
}
template <>
__device__ __forceinline__ uint16_t vec_elem<uint16_t>(const uint4& v, int t) {
  const uint32_t w = vec_elem<uint32_t>(v, t >> 1);
  return static_cast<uint16_t>(w >> (16 * (t & 1)));
}

// ---- the per-row accumulator --------------------------------------------------
// (key, idx): the best element so far; (m, s): running max of the non-NaN
// values and sum of exp(x - m) (online softmax, rescaled when m grows).
struct Acc {
  uint32_t key;
  uint32_t idx;
  float m;
  float s;
};
static_assert(sizeof(Acc) == 16, "Acc is stored in the split-row workspace");

__device__ __forceinline__ void acc_init(Acc& a) {
  a.key = 0;  // below every real key (the smallest, -inf's, is > 0)
  a.idx = 0xffffffffu;
  a.m = -CUDART_INF_F;
  a.s = 0.f;
}

// Elements must arrive in increasing index order within one accumulator, so
// a strict > keeps the first maximum.
template <bool kProb>
__device__ __forceinline__ void acc_push(Acc& a, uint32_t key, uint32_t idx, float x) {
  if (key > a.key) {
    a.key = key;
    a.idx = idx;
  }
  if (kProb) {
    if (x > a.m) {  // also from m = -inf: exp(-inf) = 0
      a.s = a.s * __expf(a.m - x) + 1.f;
      a.m = x;
    } else if (x > -CUDART_INF_F) {  // skips NaN and -inf (which adds 0)
      a.s += __expf(x - a.m);
    }
  }
}

template <bool kProb>
__device__ __forceinline__ void acc_merge(Acc& a, const Acc& b) {
  if (b.key > a.key || (b.key == a.key && b.idx < a.idx)) {
    a.key = b.key;
    a.idx = b.idx;
  }
  if (kProb) {
    const float m = fmaxf(a.m, b.m);
    float s = 0.f;
    if (a.s != 0.f) s += a.s * __expf(a.m - m);
    if (b.s != 0.f) s += b.s * __expf(b.m - m);
    a.m = m;
    a.s = s;
  }
}

// Butterfly over aligned groups of `width` lanes (a power of two <= 32); the
// merge is symmetric, so every lane of a group ends with the same result.
template <bool kProb>
__device__ __forceinline__ void acc_reduce_lanes(Acc& a, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) {
    Acc b;
    b.key = __shfl_xor_sync(0xffffffffu, a.key, offset);
    b.idx = __shfl_xor_sync(0xffffffffu, a.idx, offset);
    if (kProb) {
      b.m = __shfl_xor_sync(0xffffffffu, a.m, offset);
      b.s = __shfl_xor_sync(0xffffffffu, a.s, offset);
    }
    acc_merge<kProb>(a, b);
  }
}

struct PackParams {
  uint8_t* out;
  int64_t out_bytes;
  int bits;
  float* prob;
  bool abstain;
  float abstain_below;
  uint32_t abstain_symbol;
};

// softmax(row)[argmax] = 1 / sum exp(x - max); NaN where torch.softmax is
// NaN: a NaN in the row, a +inf (inf - inf), or a row of only -inf.
template <class E>
__device__ __forceinline__ float acc_prob(const Acc& a) {
  if (a.key == E::kNanKey || a.m == CUDART_INF_F || a.m == -CUDART_INF_F) return CUDART_NAN_F;
  return 1.f / a.s;
}

// The row's symbol; writes its probability when asked for.
template <class E, bool kProb>
__device__ __forceinline__ uint32_t finish_row(const Acc& a, int64_t row, const PackParams& p) {
  uint32_t symbol = a.idx;
  if (kProb) {
    const float prob = acc_prob<E>(a);
    if (p.prob != nullptr) p.prob[row] = prob;
    if (p.abstain && !(prob >= p.abstain_below)) symbol = p.abstain_symbol;
  }
  return symbol;
}

// Packs sym[0..nrows) (nrows a multiple of 32, row0 a multiple of 32; rows
// past the end hold 0) into the stream. Ends with no barrier.
__device__ void store_packed_rows(const uint32_t* sym, int nrows, int64_t row0,
                                  const PackParams& p) {
  const int b = p.bits;
  const int words = (nrows / 32) * b;
  const int64_t word0 = (row0 / 32) * b;
  for (int t = threadIdx.x; t < words; t += blockDim.x) {
    const int group = t / b;
    store_stream_word(p.out, p.out_bytes, word0 + t,
                      pack_word32(sym + 32 * group, b, t - group * b));
  }
}

// Accumulates elements [c0, c1) of one row over `nlanes` lanes (this thread
// is `lane`): a scalar head up to the first 16-byte boundary, 16-byte loads
// for the body, a scalar tail; each lane sees its indices in increasing order.
template <class E, bool kProb>
__device__ __forceinline__ void scan_range(const typename E::Bits* row, int64_t c0, int64_t c1,
                                           int lane, int nlanes, Acc& a) {
  using Bits = typename E::Bits;
  constexpr int kVec = 16 / sizeof(Bits);
  const Bits* p = row + c0;
  const int64_t count = c1 - c0;
  const int misalign = static_cast<int>((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(Bits));
  const int64_t nhead = misalign ? min64(kVec - misalign, count) : 0;
  for (int64_t j = lane; j < nhead; j += nlanes) {
    const Bits u = p[j];
    acc_push<kProb>(a, E::key(u), static_cast<uint32_t>(c0 + j), E::value(u));
  }
  const int64_t nvec = (count - nhead) / kVec;
  const uint4* vp = reinterpret_cast<const uint4*>(p + nhead);
  const uint32_t body0 = static_cast<uint32_t>(c0 + nhead);
  for (int64_t v0 = lane; v0 < nvec; v0 += static_cast<int64_t>(nlanes) * kUnroll) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * nlanes;
      if (v < nvec) buf[u] = __ldcs(vp + v);  // streamed once: evict first
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + static_cast<int64_t>(u) * nlanes;
      if (v < nvec) {
        const uint32_t idx0 = body0 + static_cast<uint32_t>(v) * kVec;
#pragma unroll
        for (int t = 0; t < kVec; ++t) {
          const Bits e = vec_elem<Bits>(buf[u], t);
          acc_push<kProb>(a, E::key(e), idx0 + t, E::value(e));
        }
      }
    }
  }
  for (int64_t j = nhead + nvec * kVec + lane; j < count; j += nlanes) {
    const Bits u = p[j];
    acc_push<kProb>(a, E::key(u), static_cast<uint32_t>(c0 + j), E::value(u));
  }
}

// ---- regime 1: rows of <= 4 KiB staged through shared memory -----------------
// A block owns 256 rows and walks them in T tiles of 256/T rows; each row is
// reduced by T consecutive lanes.
template <class E, int T, bool kProb>
__global__ void __launch_bounds__(kThreads)
    argmax_staged_kernel(const typename E::Bits* __restrict__ logits, int64_t rows, int64_t cols,
                         PackParams p) {
  using Bits = typename E::Bits;
  constexpr int kVec = 16 / sizeof(Bits);
  constexpr int kRowsPerTile = kThreads / T;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Bits* tile = reinterpret_cast<Bits*>(smem_raw);
  __shared__ uint32_t sym[kThreads];

  const int tid = threadIdx.x;
  const int r_local = tid / T;
  const int lane = tid % T;
  const int64_t block_row0 = static_cast<int64_t>(blockIdx.x) * kThreads;

  for (int t = 0; t < T; ++t) {
    const int64_t r0 = block_row0 + static_cast<int64_t>(t) * kRowsPerTile;
    const int64_t row = r0 + r_local;
    if (r0 >= rows) {  // uniform over the block
      if (lane == 0) sym[t * kRowsPerTile + r_local] = 0;
      continue;
    }
    const int64_t r1 = min64(r0 + kRowsPerTile, rows);
    const int64_t count = (r1 - r0) * cols;
    const Bits* g = logits + r0 * cols;
    // Element e of the tile goes to tile[h + e], h chosen so that 16-byte
    // aligned global chunks land on 16-byte aligned shared addresses.
    const int h = static_cast<int>((reinterpret_cast<uintptr_t>(g) & 15) / sizeof(Bits));
    const int64_t nhead = h ? min64(kVec - h, count) : 0;
    const int64_t nvec = (count - nhead) / kVec;
    const int64_t tail0 = nhead + nvec * kVec;
    for (int64_t i = tid; i < nhead; i += kThreads) tile[h + i] = g[i];
    const uint4* gv = reinterpret_cast<const uint4*>(g + nhead);
    uint4* sv = reinterpret_cast<uint4*>(tile + h + nhead);
#pragma unroll 4
    for (int64_t i = tid; i < nvec; i += kThreads) sv[i] = __ldcs(gv + i);
    for (int64_t i = tail0 + tid; i < count; i += kThreads) tile[h + i] = g[i];
    __syncthreads();

    Acc a;
    acc_init(a);
    if (row < rows) {
      const Bits* rp = tile + h + static_cast<int64_t>(r_local) * cols;
      for (int64_t j = lane; j < cols; j += T) {
        const Bits u = rp[j];
        acc_push<kProb>(a, E::key(u), static_cast<uint32_t>(j), E::value(u));
      }
    }
    acc_reduce_lanes<kProb>(a, T);
    if (lane == 0)
      sym[t * kRowsPerTile + r_local] = row < rows ? finish_row<E, kProb>(a, row, p) : 0;
    __syncthreads();  // the next tile overwrites the staging buffer
  }
  __syncthreads();
  store_packed_rows(sym, kThreads, block_row0, p);
}

// ---- regime 2: one warp per row ------------------------------------------------
// A block of 8 warps owns 32 rows, 4 per warp.
template <class E, bool kProb>
__global__ void __launch_bounds__(kThreads)
    argmax_warp_kernel(const typename E::Bits* __restrict__ logits, int64_t rows, int64_t cols,
                       PackParams p) {
  __shared__ uint32_t sym[32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 32;
  for (int r = warp; r < 32; r += kThreads / 32) {
    const int64_t row = row0 + r;
    Acc a;
    acc_init(a);
    if (row < rows) scan_range<E, kProb>(logits + row * cols, 0, cols, lane, 32, a);
    acc_reduce_lanes<kProb>(a, 32);
    if (lane == 0) sym[r] = row < rows ? finish_row<E, kProb>(a, row, p) : 0;
  }
  __syncthreads();
  store_packed_rows(sym, 32, row0, p);
}

// ---- regime 3: few rows of huge C, split over blocks ----------------------------
// Block (row, chunk) reduces columns [chunk * chunk_cols, ...) of its row.
template <class E, bool kProb>
__global__ void __launch_bounds__(kThreads)
    argmax_split_partial_kernel(const typename E::Bits* __restrict__ logits, int64_t cols,
                                int chunks, int64_t chunk_cols, Acc* __restrict__ partial) {
  __shared__ Acc warp_acc[kThreads / 32];
  const int64_t row = blockIdx.x / chunks;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % chunks) * chunk_cols;
  const int64_t c1 = min64(c0 + chunk_cols, cols);
  Acc a;
  acc_init(a);
  if (c0 < c1) scan_range<E, kProb>(logits + row * cols, c0, c1, threadIdx.x, kThreads, a);
  acc_reduce_lanes<kProb>(a, 32);
  if (threadIdx.x % 32 == 0) warp_acc[threadIdx.x / 32] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc r = warp_acc[0];
    for (int w = 1; w < kThreads / 32; ++w) acc_merge<kProb>(r, warp_acc[w]);
    partial[blockIdx.x] = r;
  }
}

// One thread per row merges the row's partials in chunk order; a block of 32
// threads owns 32 rows.
template <class E, bool kProb>
__global__ void __launch_bounds__(32)
    argmax_split_combine_kernel(const Acc* __restrict__ partial, int64_t rows, int chunks,
                                PackParams p) {
  __shared__ uint32_t sym[32];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t row = row0 + threadIdx.x;
  uint32_t s = 0;
  if (row < rows) {
    Acc a = partial[row * chunks];
    for (int c = 1; c < chunks; ++c) acc_merge<kProb>(a, partial[row * chunks + c]);
    s = finish_row<E, kProb>(a, row, p);
  }
  sym[threadIdx.x] = s;
  __syncthreads();
  store_packed_rows(sym, 32, row0, p);
}

// ---- host side --------------------------------------------------------------------
template <class E, int T, bool kProb>
cudaError_t launch_staged(const PackArgmaxArgs& args, const PackParams& p, cudaStream_t stream) {
  const size_t es = sizeof(typename E::Bits);
  const size_t smem = static_cast<size_t>(kThreads / T) * args.cols * es + 16;
  const int64_t blocks = (args.rows + kThreads - 1) / kThreads;
  argmax_staged_kernel<E, T, kProb><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      static_cast<const typename E::Bits*>(args.logits), args.rows, args.cols, p);
  return cudaGetLastError();
}

template <class E, bool kProb>
cudaError_t launch_typed(const PackArgmaxArgs& args, const PackParams& p, const Allocator& alloc,
                         cudaStream_t stream) {
  using Bits = typename E::Bits;
  const Bits* logits = static_cast<const Bits*>(args.logits);
  const int64_t row_bytes = args.cols * static_cast<int64_t>(sizeof(Bits));
  if (row_bytes <= kStagedMaxRowBytes) {
    // T lanes per row, so that a tile of 256/T rows is at most 32 KiB.
    if (row_bytes <= 128) return launch_staged<E, 1, kProb>(args, p, stream);
    if (row_bytes <= 256) return launch_staged<E, 2, kProb>(args, p, stream);
    return launch_staged<E, 4, kProb>(args, p, stream);
  }
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Split rows when there are too few to keep ~16 warps per SM busy, into
  // chunks of >= 4096 columns, aiming at ~4 blocks of 8 warps per SM.
  int64_t chunks = 1;
  if (args.rows < static_cast<int64_t>(sms) * 16) {
    chunks = (4 * static_cast<int64_t>(sms) + args.rows - 1) / args.rows;
    chunks = min64(chunks, (args.cols + 4095) / 4096);
  }
  if (chunks >= 2) {
    const int64_t chunk_cols = (args.cols + chunks - 1) / chunks;
    Acc* partial = static_cast<Acc*>(alloc(static_cast<size_t>(args.rows * chunks) * sizeof(Acc)));
    argmax_split_partial_kernel<E, kProb>
        <<<static_cast<unsigned>(args.rows * chunks), kThreads, 0, stream>>>(
            logits, args.cols, static_cast<int>(chunks), chunk_cols, partial);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    argmax_split_combine_kernel<E, kProb>
        <<<static_cast<unsigned>((args.rows + 31) / 32), 32, 0, stream>>>(
            partial, args.rows, static_cast<int>(chunks), p);
    return cudaGetLastError();
  }
  argmax_warp_kernel<E, kProb>
      <<<static_cast<unsigned>((args.rows + 31) / 32), kThreads, 0, stream>>>(logits, args.rows,
                                                                              args.cols, p);
  return cudaGetLastError();
}

template <class E>
cudaError_t launch_dtype(const PackArgmaxArgs& args, const PackParams& p, const Allocator& alloc,
                         cudaStream_t stream) {
  const bool need_prob = args.prob != nullptr || args.abstain;
  return need_prob ? launch_typed<E, true>(args, p, alloc, stream)
                   : launch_typed<E, false>(args, p, alloc, stream);
}

}  // namespace

cudaError_t launch_pack_argmax(const PackArgmaxArgs& args, const Allocator& alloc,
                               cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  PackParams p;
  p.out = args.out;
  p.out_bytes = args.out_bytes;
  p.bits = args.bits;
  p.prob = args.prob;
  p.abstain = args.abstain;
  p.abstain_below = args.abstain_below;
  p.abstain_symbol = static_cast<uint32_t>(args.cols);
  switch (args.dtype) {
    case FloatType::kFloat32:
      return launch_dtype<F32>(args, p, alloc, stream);
    case FloatType::kFloat16:
      return launch_dtype<F16>(args, p, alloc, stream);
    case FloatType::kBFloat16:
      return launch_dtype<BF16>(args, p, alloc, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace tallytrain
