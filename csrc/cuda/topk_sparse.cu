// topk_sparse and topk_sparse_ef on CUDA: the exact k entries of largest |x|
// (ties at the threshold to the lower index), indices ascending.
//
// Keys: |x| ordered as unsigned integers (the float's bits without the sign
// bit), so +-0 tie and the order is exact. The selected set is the first k
// of the order (key descending, index ascending); it is found without any
// sort:
//
// 1. Sample: a deterministic strided sample of 2**18 keys; a radix select
//    finds its r-th largest key, with r over-provisioned (e + 4 sqrt(e) + 8
//    for e = k * S / M expected), as a candidate threshold.
// 2. One pass over x (for error feedback over acc = x + residual, computed on
//    the fly) checks for NaN and emits the candidates (key >= threshold) in
//    index order: tiles are taken in order from a ticket counter and find
//    their output offset by a decoupled look-back over the previous tiles'
//    counts.
// 3. The only synchronisation: the host reads the candidate count and the
//    first NaN. Only then, with no NaN, error feedback writes acc back to
//    residual (one more pass), so that an error leaves residual untouched.
//    With k <= count <= capacity, a radix select over the
//    candidates finds the exact k-th key m* and how many of the k are ties
//    (q = k - #{key > m*}); one more ordered pass over the candidates keeps
//    key > m* and the first q keys == m* (two look-back chains), writing the
//    answer in index order, with its values (and zeroing residual there).
//    Otherwise (a rare miss of the sample, or k close to M) the same radix
//    select and ordered pass run over all of x: slower, equally exact.
// Every step is deterministic: integer counts and order-defined positions.
#include <cuda/atomic>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>

#include "launchers.h"
#include "tallytrain/common.h"

namespace tallytrain {
namespace cuda {
namespace {

using u64 = unsigned long long;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecsPerThread = 4;  // tile = 256 threads x 4 vectors
constexpr int kFieldBits = 16;     // per-vector counts packed in one 64-bit scan
constexpr int64_t kSampleSize = 1 << 18;
constexpr int kDigitBits = 11;  // radix-select digit: 2048 bins
constexpr int kMaxBins = 1 << kDigitBits;

// ---- element types ---------------------------------------------------------------
// Bits: storage; Key: |x| as an unsigned integer of kKeyBits bits.
struct TF32 {
  using Bits = uint32_t;
  using Key = uint32_t;
  static constexpr int kKeyBits = 31;
  __device__ static Key key(Bits u) { return u & 0x7fffffffu; }
  __device__ static bool is_nan(Bits u) { return (u & 0x7fffffffu) > 0x7f800000u; }
  __device__ static Bits add(Bits a, Bits b) {
    return __float_as_uint(__fadd_rn(__uint_as_float(a), __uint_as_float(b)));
  }
};
struct TF64 {
  using Bits = u64;
  using Key = u64;
  static constexpr int kKeyBits = 63;
  __device__ static Key key(Bits u) { return u & 0x7fffffffffffffffull; }
  __device__ static bool is_nan(Bits u) {
    return (u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
  }
  __device__ static Bits add(Bits a, Bits b) {
    return static_cast<u64>(
        __double_as_longlong(__dadd_rn(__longlong_as_double(static_cast<long long>(a)),
                                       __longlong_as_double(static_cast<long long>(b)))));
  }
};
// 16-bit floats add like torch: in float32, then rounded to nearest even.
struct TF16 {
  using Bits = uint16_t;
  using Key = uint32_t;
  static constexpr int kKeyBits = 15;
  __device__ static Key key(Bits u) { return u & 0x7fffu; }
  __device__ static bool is_nan(Bits u) { return (u & 0x7fffu) > 0x7c00u; }
  __device__ static Bits add(Bits a, Bits b) {
    const float s = __fadd_rn(__half2float(__ushort_as_half(a)), __half2float(__ushort_as_half(b)));
    return __half_as_ushort(__float2half_rn(s));
  }
};
struct TBF16 {
  using Bits = uint16_t;
  using Key = uint32_t;
  static constexpr int kKeyBits = 15;
  __device__ static Key key(Bits u) { return u & 0x7fffu; }
  __device__ static bool is_nan(Bits u) { return (u & 0x7fffu) > 0x7f80u; }
  __device__ static Bits add(Bits a, Bits b) {
    const float s = __fadd_rn(__uint_as_float(static_cast<uint32_t>(a) << 16),
                              __uint_as_float(static_cast<uint32_t>(b) << 16));
    uint32_t u = __float_as_uint(s);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN, as c10::BFloat16
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<Bits>(u >> 16);
  }
};

// ---- 16-byte vectors --------------------------------------------------------------
template <class Bits>
struct Vec {
  static constexpr int kWidth = 16 / sizeof(Bits);
  __device__ static void unpack(const uint4& v, Bits (&out)[kWidth]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int t = 0; t < kWidth; ++t) {
      if (sizeof(Bits) == 4) out[t] = static_cast<Bits>(w[t]);
      if (sizeof(Bits) == 2) out[t] = static_cast<Bits>(w[t / 2] >> (16 * (t % 2)));
      if (sizeof(Bits) == 8)
        out[t] = static_cast<Bits>((static_cast<u64>(w[2 * t + 1]) << 32) | w[2 * t]);
    }
  }
  __device__ static uint4 pack(const Bits (&in)[kWidth]) {
    uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int t = 0; t < kWidth; ++t) {
      if (sizeof(Bits) == 4) w[t] = static_cast<uint32_t>(in[t]);
      if (sizeof(Bits) == 2) w[t / 2] |= static_cast<uint32_t>(in[t]) << (16 * (t % 2));
      if (sizeof(Bits) == 8) {
        w[2 * t] = static_cast<uint32_t>(static_cast<u64>(in[t]));
        w[2 * t + 1] = static_cast<uint32_t>(static_cast<u64>(in[t]) >> 32);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Loads elements [e0, e0 + W) (those < m): one 16-byte load when the vector
// is whole and the array 16-byte aligned.
template <class Bits>
__device__ __forceinline__ void load_vec(const Bits* p, int64_t e0, int64_t m, bool aligned,
                                         Bits (&out)[Vec<Bits>::kWidth]) {
  constexpr int W = Vec<Bits>::kWidth;
  if (aligned && e0 + W <= m) {
    Vec<Bits>::unpack(__ldcs(reinterpret_cast<const uint4*>(p + e0)), out);
  } else {
#pragma unroll
    for (int t = 0; t < W; ++t) out[t] = e0 + t < m ? p[e0 + t] : Bits(0);
  }
}

template <class Bits>
__device__ __forceinline__ void store_vec(Bits* p, int64_t e0, int64_t m, bool aligned,
                                          const Bits (&in)[Vec<Bits>::kWidth]) {
  constexpr int W = Vec<Bits>::kWidth;
  if (aligned && e0 + W <= m) {
    *reinterpret_cast<uint4*>(p + e0) = Vec<Bits>::pack(in);
  } else {
#pragma unroll
    for (int t = 0; t < W; ++t)
      if (e0 + t < m) p[e0 + t] = in[t];
  }
}

// ---- ordered emission: tickets, block scan, decoupled look-back ---------------------
struct Counters {
  u64 ticket;     // next tile to take
  u64 total;      // candidates (or selected) in all tiles
  u64 nan_first;  // smallest index of a NaN, ~0 if none
};

// (Inside tallytrain::cuda, libcu++ must be named as ::cuda.)
using DeviceAtomic = ::cuda::atomic_ref<u64, ::cuda::thread_scope_device>;
constexpr auto kRelaxed = ::cuda::memory_order_relaxed;

constexpr u64 kFlagAggregate = 1ull << 62;
constexpr u64 kFlagPrefix = 2ull << 62;
constexpr u64 kValueMask = (1ull << 62) - 1;

// Publishes this tile's count and returns the sum of the counts of all
// previous tiles. Tiles are taken in ticket order, so every tile it waits for
// is held by a running block that waits only on earlier tiles.
__device__ u64 lookback(u64* status, u64 tile, u64 aggregate) {
  DeviceAtomic mine(status[tile]);
  if (tile == 0) {
    mine.store(kFlagPrefix | aggregate, kRelaxed);
    return 0;
  }
  mine.store(kFlagAggregate | aggregate, kRelaxed);
  u64 exclusive = 0;
  for (u64 j = tile - 1;; --j) {
    DeviceAtomic other(status[j]);
    u64 s = other.load(kRelaxed);
    while ((s >> 62) == 0) {
      __nanosleep(32);
      s = other.load(kRelaxed);
    }
    exclusive += s & kValueMask;
    if ((s >> 62) == 2) break;
  }
  mine.store(kFlagPrefix | (exclusive + aggregate), kRelaxed);
  return exclusive;
}

// Per-tile shared state of the ordered kernels (kChains independent scans).
template <int kChains>
struct TileShared {
  u64 warp_sums[kChains][kWarps];
  u64 prefix[kChains];
  u64 tile;
};

// Block-wide exclusive scan of packed per-vector counts (one 16-bit field per
// vector, sums <= 2048 so fields never carry); also returns the block total.
template <int kChains>
__device__ __forceinline__ void block_scan(const u64 (&v)[kChains], u64 (&excl)[kChains],
                                           u64 (&total)[kChains], TileShared<kChains>& sh) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  u64 incl[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) {
    u64 x = v[c];
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const u64 y = __shfl_up_sync(0xffffffffu, x, offset);
      if (lane >= offset) x += y;
    }
    incl[c] = x;
    if (lane == 31) sh.warp_sums[c][warp] = x;
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kChains; ++c) {
    u64 before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const u64 s = sh.warp_sums[c][w];
      before += w < warp ? s : 0;
      all += s;
    }
    excl[c] = before + incl[c] - v[c];
    total[c] = all;
  }
}

__device__ __forceinline__ u64 field(u64 packed, int v) {
  return (packed >> (kFieldBits * v)) & ((1ull << kFieldBits) - 1);
}
__device__ __forceinline__ u64 sum_fields(u64 packed) {
  u64 s = 0;
#pragma unroll
  for (int v = 0; v < kVecsPerThread; ++v) s += field(packed, v);
  return s;
}
// Offset of vector v's first item within the tile, given the scan results.
__device__ __forceinline__ u64 vector_offset(u64 excl, u64 total, int v) {
  u64 before = 0;
#pragma unroll
  for (int w = 0; w < kVecsPerThread; ++w) before += w < v ? field(total, w) : 0;
  return before + field(excl, v);
}

// ---- the elementwise passes: the NaN check, and acc = x + residual written back -----
// kWrite: store acc into residual (error feedback, after the NaN check);
// otherwise look for NaN in x (+ residual) only.
template <class Tr, bool kEf, bool kWrite>
__global__ void __launch_bounds__(kThreads)
    topk_elementwise_kernel(const typename Tr::Bits* __restrict__ x, typename Tr::Bits* residual,
                            int64_t m, bool aligned, Counters* ctr) {
  using Bits = typename Tr::Bits;
  constexpr int W = Vec<Bits>::kWidth;
  const int64_t nvec = (m + W - 1) / W;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e0 = v * W;
    Bits a[W];
    load_vec(x, e0, m, aligned, a);
    if (kEf) {
      Bits r[W];
      load_vec<Bits>(residual, e0, m, aligned, r);
#pragma unroll
      for (int t = 0; t < W; ++t) a[t] = Tr::add(a[t], r[t]);
      if (kWrite) store_vec(residual, e0, m, aligned, a);
    }
    if (!kWrite) {
#pragma unroll
      for (int t = 0; t < W; ++t)
        if (e0 + t < m && Tr::is_nan(a[t])) atomicMin(&ctr->nan_first, static_cast<u64>(e0 + t));
    }
  }
}

// ---- step 1: the sample ------------------------------------------------------------
template <class Tr, bool kEf>
__global__ void __launch_bounds__(kThreads)
    topk_sample_kernel(const typename Tr::Bits* __restrict__ x,
                       const typename Tr::Bits* __restrict__ residual, int64_t m, int64_t samples,
                       typename Tr::Key* __restrict__ keys) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= samples) return;
  const int64_t e =
      static_cast<int64_t>((static_cast<u64>(j) * static_cast<u64>(m)) / static_cast<u64>(samples));
  typename Tr::Bits a = x[e];
  if (kEf) a = Tr::add(a, residual[e]);
  keys[j] = Tr::key(a);
}

// ---- item sources for the radix select and the ordered selection ---------------------
// Dense: the keys of an array of floats, W per vector; index = position.
template <class Tr>
struct DenseItems {
  using Key = typename Tr::Key;
  static constexpr int kWidth = Vec<typename Tr::Bits>::kWidth;
  const typename Tr::Bits* data;
  int64_t count;
  bool aligned;
  __device__ void load(int64_t e0, Key (&key)[kWidth]) const {
    typename Tr::Bits b[kWidth];
    load_vec(data, e0, count, aligned, b);
#pragma unroll
    for (int t = 0; t < kWidth; ++t) key[t] = Tr::key(b[t]);
  }
  __device__ int64_t index(int64_t e) const { return e; }
};

// List: candidate (index, key) pairs, one per vector.
template <class Tr>
struct ListItems {
  using Key = typename Tr::Key;
  static constexpr int kWidth = 1;
  const u64* indices;
  const Key* keys;
  int64_t count;
  __device__ void load(int64_t e0, Key (&key)[1]) const { key[0] = e0 < count ? keys[e0] : Key(0); }
  __device__ int64_t index(int64_t e) const { return static_cast<int64_t>(indices[e]); }
};

// ---- radix select: the k-th largest key, digit by digit -------------------------------
struct SelectState {
  u64 prefix;     // the digits found so far (after the last pass: the key m*)
  u64 remaining;  // rank still sought among keys matching prefix (after the last: ties taken)
  u64 greater;    // keys known to be larger than every key matching prefix
};

__global__ void select_init_kernel(SelectState* st, u64 k) {
  st->prefix = 0;
  st->remaining = k;
  st->greater = 0;
}

// Histogram of digit (key >> shift) & (2**width - 1) over the keys whose
// higher digits equal the prefix found so far. Shared-memory counts, merged
// with one atomic per bin and block (integers: order-independent).
template <class Items>
__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(Items items, const SelectState* __restrict__ st, int shift, int width,
                           u64* __restrict__ bins) {
  constexpr int W = Items::kWidth;
  using Key = typename Items::Key;
  __shared__ uint32_t local[kMaxBins];
  const int nbins = 1 << width;
  for (int b = threadIdx.x; b < nbins; b += kThreads) local[b] = 0;
  __syncthreads();
  const int high = shift + width;  // <= 63
  const u64 want = st->prefix >> high;
  const int lane = threadIdx.x % 32;
  const int64_t nvec = (items.count + W - 1) / W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // The loop bound is uniform over each warp, for __match_any_sync.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + (threadIdx.x - lane);
       base < nvec; base += stride) {
    const int64_t v = base + lane;
    Key key[W];
    if (v < nvec) items.load(v * W, key);
#pragma unroll
    for (int t = 0; t < W; ++t) {
      uint32_t bin = 0xffffffffu;
      if (v < nvec && v * W + t < items.count && (static_cast<u64>(key[t]) >> high) == want)
        bin = static_cast<uint32_t>((static_cast<u64>(key[t]) >> shift) & (nbins - 1));
      const unsigned same = __match_any_sync(0xffffffffu, bin);
      if (bin != 0xffffffffu && lane == __ffs(same) - 1) atomicAdd(&local[bin], __popc(same));
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += kThreads)
    if (local[b] != 0) atomicAdd(bins + b, static_cast<u64>(local[b]));
}

// One block: finds the bin b* holding the remaining-th largest key (counting
// from the top bin) and narrows the state to it.
__global__ void __launch_bounds__(kThreads)
    radix_pick_kernel(const u64* __restrict__ bins, int shift, int width, SelectState* st) {
  __shared__ u64 sums[kThreads];
  const int nbins = 1 << width;
  const int per = (nbins + kThreads - 1) / kThreads;
  const int lo = threadIdx.x * per;
  const int hi = min(lo + per, nbins);  // bins [lo, hi)
  u64 mine = 0;
  for (int b = lo; b < hi; ++b) mine += bins[b];
  sums[threadIdx.x] = mine;
  __syncthreads();
  u64 above = 0;  // keys in the bins above this thread's
  for (int t = threadIdx.x + 1; t < kThreads; ++t) above += sums[t];
  const u64 remaining = st->remaining;
  __syncthreads();  // everyone has read st before it changes
  for (int b = hi - 1; b >= lo; --b) {
    if (above < remaining && remaining <= above + bins[b]) {
      st->prefix |= static_cast<u64>(b) << shift;
      st->remaining = remaining - above;
      st->greater += above;
    }
    above += bins[b];
  }
}

// ---- step 2: candidates, in index order ---------------------------------------------
template <class Tr, bool kEf>
__global__ void __launch_bounds__(kThreads)
    topk_candidates_kernel(const typename Tr::Bits* __restrict__ x,
                           const typename Tr::Bits* __restrict__ residual, int64_t m, bool aligned,
                           const SelectState* __restrict__ threshold,
                           u64* __restrict__ cand_indices, typename Tr::Key* __restrict__ cand_keys,
                           u64 capacity, u64* status, u64 num_tiles, Counters* ctr) {
  using Bits = typename Tr::Bits;
  using Key = typename Tr::Key;
  constexpr int W = Vec<Bits>::kWidth;
  constexpr int64_t kTileItems = static_cast<int64_t>(kThreads) * kVecsPerThread * W;
  __shared__ TileShared<1> sh;
  const Key lo = static_cast<Key>(threshold->prefix);
  for (;;) {
    if (threadIdx.x == 0) sh.tile = atomicAdd(&ctr->ticket, 1ull);
    __syncthreads();
    const u64 tile = sh.tile;
    if (tile >= num_tiles) break;
    const int64_t tile0 = static_cast<int64_t>(tile) * kTileItems;

    Key key[kVecsPerThread][W];
    uint32_t selected = 0;  // bit v * W + t
    u64 packed[1] = {0};
#pragma unroll
    for (int v = 0; v < kVecsPerThread; ++v) {
      const int64_t e0 = tile0 + (static_cast<int64_t>(v) * kThreads + threadIdx.x) * W;
      Bits a[W];
      load_vec(x, e0, m, aligned, a);
      if (kEf) {
        Bits r[W];
        load_vec(residual, e0, m, aligned, r);
#pragma unroll
        for (int t = 0; t < W; ++t) a[t] = Tr::add(a[t], r[t]);
      }
      u64 count = 0;
#pragma unroll
      for (int t = 0; t < W; ++t) {
        key[v][t] = Tr::key(a[t]);
        if (e0 + t < m) {
          if (Tr::is_nan(a[t])) atomicMin(&ctr->nan_first, static_cast<u64>(e0 + t));
          if (key[v][t] >= lo) {
            selected |= 1u << (v * W + t);
            ++count;
          }
        }
      }
      packed[0] |= count << (kFieldBits * v);
    }
    u64 excl[1], total[1];
    block_scan<1>(packed, excl, total, sh);
    if (threadIdx.x == 0) {
      const u64 aggregate = sum_fields(total[0]);
      const u64 before = lookback(status, tile, aggregate);
      sh.prefix[0] = before;
      if (tile == num_tiles - 1) ctr->total = before + aggregate;
    }
    __syncthreads();
#pragma unroll
    for (int v = 0; v < kVecsPerThread; ++v) {
      u64 pos = sh.prefix[0] + vector_offset(excl[0], total[0], v);
      const int64_t e0 = tile0 + (static_cast<int64_t>(v) * kThreads + threadIdx.x) * W;
#pragma unroll
      for (int t = 0; t < W; ++t) {
        if ((selected >> (v * W + t)) & 1u) {
          if (pos < capacity) {
            cand_indices[pos] = static_cast<u64>(e0 + t);
            cand_keys[pos] = key[v][t];
          }
          ++pos;
        }
      }
    }
    __syncthreads();  // sh is rewritten by the next tile
  }
}

// ---- step 3: the exact selection, in index order --------------------------------------
// Keeps key > m* and the first q keys == m* (q = k - #{key > m*}); item e
// goes to position #{key > m* before e} + min(#{key == m* before e}, q).
// Writes indices and values (read from src, the data the keys came from);
// with error feedback src is the residual, zeroed at the selected indices.
template <class Tr, class Items, bool kEf>
__global__ void __launch_bounds__(kThreads)
    topk_select_kernel(Items items, typename Tr::Bits* src, const SelectState* __restrict__ st,
                       int64_t* __restrict__ out_indices,
                       typename Tr::Bits* __restrict__ out_values, u64* status_gt, u64* status_eq,
                       u64 num_tiles, Counters* ctr) {
  using Key = typename Tr::Key;
  constexpr int W = Items::kWidth;
  constexpr int64_t kTileItems = static_cast<int64_t>(kThreads) * kVecsPerThread * W;
  __shared__ TileShared<2> sh;
  const Key pivot = static_cast<Key>(st->prefix);
  const u64 quota = st->remaining;
  for (;;) {
    if (threadIdx.x == 0) sh.tile = atomicAdd(&ctr->ticket, 1ull);
    __syncthreads();
    const u64 tile = sh.tile;
    if (tile >= num_tiles) break;
    const int64_t tile0 = static_cast<int64_t>(tile) * kTileItems;

    uint32_t gt = 0, eq = 0;  // bit v * W + t
    u64 packed[2] = {0, 0};
#pragma unroll
    for (int v = 0; v < kVecsPerThread; ++v) {
      const int64_t e0 = tile0 + (static_cast<int64_t>(v) * kThreads + threadIdx.x) * W;
      Key key[W];
      if (e0 < items.count) items.load(e0, key);
      u64 ngt = 0, neq = 0;
#pragma unroll
      for (int t = 0; t < W; ++t) {
        if (e0 + t < items.count) {
          if (key[t] > pivot) {
            gt |= 1u << (v * W + t);
            ++ngt;
          } else if (key[t] == pivot) {
            eq |= 1u << (v * W + t);
            ++neq;
          }
        }
      }
      packed[0] |= ngt << (kFieldBits * v);
      packed[1] |= neq << (kFieldBits * v);
    }
    u64 excl[2], total[2];
    block_scan<2>(packed, excl, total, sh);
    if (threadIdx.x == 0) {
      sh.prefix[0] = lookback(status_gt, tile, sum_fields(total[0]));
      sh.prefix[1] = lookback(status_eq, tile, sum_fields(total[1]));
    }
    __syncthreads();
#pragma unroll
    for (int v = 0; v < kVecsPerThread; ++v) {
      u64 n_gt = sh.prefix[0] + vector_offset(excl[0], total[0], v);
      u64 n_eq = sh.prefix[1] + vector_offset(excl[1], total[1], v);
      const int64_t e0 = tile0 + (static_cast<int64_t>(v) * kThreads + threadIdx.x) * W;
#pragma unroll
      for (int t = 0; t < W; ++t) {
        const bool is_gt = (gt >> (v * W + t)) & 1u;
        const bool is_eq = (eq >> (v * W + t)) & 1u;
        if (is_gt || (is_eq && n_eq < quota)) {
          const u64 pos = n_gt + (n_eq < quota ? n_eq : quota);
          const int64_t index = items.index(e0 + t);
          out_indices[pos] = index;
          out_values[pos] = src[index];
          if (kEf) src[index] = 0;
        }
        n_gt += is_gt;
        n_eq += is_eq;
      }
    }
    __syncthreads();
  }
}

// k == M: everything, in order.
template <class Tr, bool kEf>
__global__ void __launch_bounds__(kThreads)
    topk_take_all_kernel(typename Tr::Bits* src, int64_t m, int64_t* __restrict__ out_indices,
                         typename Tr::Bits* __restrict__ out_values) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < m;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    out_indices[i] = i;
    out_values[i] = src[i];
    if (kEf) src[i] = 0;
  }
}

// ---- host side ------------------------------------------------------------------------
struct Launch {
  cudaStream_t stream;
  const Allocator& alloc;
  int sms;
  cudaError_t err = cudaSuccess;

  template <typename T>
  T* take(size_t count) {
    return static_cast<T*>(alloc(count * sizeof(T)));
  }
  bool check() {
    if (err == cudaSuccess) err = cudaGetLastError();
    return err == cudaSuccess;
  }
  // A grid of at most `blocks_per_sm` resident blocks per SM, for kernels that
  // loop over their work.
  unsigned grid(int64_t work_blocks, int blocks_per_sm = 8) const {
    return static_cast<unsigned>(std::max<int64_t>(
        1, std::min<int64_t>(work_blocks, static_cast<int64_t>(sms) * blocks_per_sm)));
  }
};

bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Radix select of the k-th largest key among `items` (1 <= k <= items.count)
// into st, digit by digit from the top.
template <class Tr, class Items>
bool radix_select(Launch& L, const Items& items, u64 k, SelectState* st) {
  select_init_kernel<<<1, 1, 0, L.stream>>>(st, k);
  if (!L.check()) return false;
  u64* bins = L.take<u64>(kMaxBins);
  const int64_t nvec = (items.count + Items::kWidth - 1) / Items::kWidth;
  for (int top = Tr::kKeyBits; top > 0; top -= kDigitBits) {
    const int width = std::min(kDigitBits, top);
    const int shift = top - width;
    L.err = cudaMemsetAsync(bins, 0, sizeof(u64) * (size_t(1) << width), L.stream);
    if (L.err != cudaSuccess) return false;
    radix_histogram_kernel<Items>
        <<<L.grid((nvec + kThreads - 1) / kThreads, 4), kThreads, 0, L.stream>>>(items, st, shift,
                                                                                 width, bins);
    if (!L.check()) return false;
    radix_pick_kernel<<<1, kThreads, 0, L.stream>>>(bins, shift, width, st);
    if (!L.check()) return false;
  }
  return true;
}

// The ordered exact selection over `items` (after radix_select into st).
template <class Tr, bool kEf, class Items>
bool select_ordered(Launch& L, const Items& items, typename Tr::Bits* src, const SelectState* st,
                    Counters* ctr, const TopkArgs& a) {
  const int64_t tile_items = static_cast<int64_t>(kThreads) * kVecsPerThread * Items::kWidth;
  const u64 tiles = static_cast<u64>((items.count + tile_items - 1) / tile_items);
  u64* status = L.take<u64>(2 * tiles);
  L.err = cudaMemsetAsync(status, 0, sizeof(u64) * 2 * tiles, L.stream);
  if (L.err == cudaSuccess) L.err = cudaMemsetAsync(&ctr->ticket, 0, sizeof(u64), L.stream);
  if (L.err != cudaSuccess) return false;
  topk_select_kernel<Tr, Items, kEf>
      <<<L.grid(static_cast<int64_t>(tiles)), kThreads, 0, L.stream>>>(
          items, src, st, a.out_indices, static_cast<typename Tr::Bits*>(a.out_values), status,
          status + tiles, tiles, ctr);
  return L.check();
}

// Copies the counters back (the op's one synchronisation).
bool read_counters(Launch& L, const Counters* ctr, Counters* host) {
  L.err = cudaMemcpyAsync(host, ctr, sizeof(Counters), cudaMemcpyDeviceToHost, L.stream);
  if (L.err == cudaSuccess) L.err = cudaStreamSynchronize(L.stream);
  return L.err == cudaSuccess;
}

template <class Tr, bool kEf>
cudaError_t run_typed(const TopkArgs& a, Launch& L, int64_t* nan_index) {
  using Bits = typename Tr::Bits;
  using Key = typename Tr::Key;
  constexpr int W = Vec<Bits>::kWidth;
  const int64_t m = a.m, k = a.k;
  const Bits* x = static_cast<const Bits*>(a.x);
  Bits* residual = static_cast<Bits*>(a.residual);
  // Where the keys live for step 3: acc in residual (once written back), or x.
  Bits* src = kEf ? residual : const_cast<Bits*>(x);
  const bool aligned = is_aligned16(x) && (!kEf || is_aligned16(residual));

  Counters* ctr = L.take<Counters>(1);
  L.err = cudaMemsetAsync(ctr, 0, sizeof(Counters), L.stream);
  if (L.err == cudaSuccess) L.err = cudaMemsetAsync(&ctr->nan_first, 0xff, sizeof(u64), L.stream);
  if (L.err != cudaSuccess) return L.err;
  SelectState* st = L.take<SelectState>(1);

  // The sample and its over-provisioned rank r (see the file comment).
  const int64_t samples = std::min<int64_t>(m, kSampleSize);
  const double expected =
      static_cast<double>(k) * static_cast<double>(samples) / static_cast<double>(m);
  const int64_t rank = static_cast<int64_t>(std::ceil(expected + 4.0 * std::sqrt(expected) + 8.0));
  const double candidates =
      static_cast<double>(rank) * static_cast<double>(m) / static_cast<double>(samples);
  const bool use_sample =
      k > 0 && k < m && rank <= samples && candidates <= 0.25 * static_cast<double>(m);

  // acc = x + residual into residual, once no NaN has been found.
  const unsigned elementwise_grid = L.grid(((m + W - 1) / W + kThreads - 1) / kThreads);
  auto write_back = [&]() -> bool {
    if constexpr (kEf) {
      topk_elementwise_kernel<Tr, kEf, true>
          <<<elementwise_grid, kThreads, 0, L.stream>>>(x, residual, m, aligned, ctr);
      return L.check();
    }
    return true;
  };

  Counters host{};
  if (!use_sample) {
    topk_elementwise_kernel<Tr, kEf, false>
        <<<elementwise_grid, kThreads, 0, L.stream>>>(x, residual, m, aligned, ctr);
    if (!L.check() || !read_counters(L, ctr, &host)) return L.err;
    if (host.nan_first != ~0ull) {
      *nan_index = static_cast<int64_t>(host.nan_first);
      return cudaSuccess;
    }
    if (!write_back() || k == 0) return L.err;
    if (k == m) {
      topk_take_all_kernel<Tr, kEf>
          <<<L.grid((m + kThreads - 1) / kThreads), kThreads, 0, L.stream>>>(
              src, m, a.out_indices, static_cast<Bits*>(a.out_values));
      L.check();
      return L.err;
    }
    const DenseItems<Tr> all{src, m, aligned && is_aligned16(src)};
    if (radix_select<Tr>(L, all, static_cast<u64>(k), st))
      select_ordered<Tr, kEf>(L, all, src, st, ctr, a);
    return L.err;
  }

  // 1. sample -> candidate threshold (st->prefix)
  Key* sample_keys = L.take<Key>(static_cast<size_t>(samples));
  topk_sample_kernel<Tr, kEf>
      <<<static_cast<unsigned>((samples + kThreads - 1) / kThreads), kThreads, 0, L.stream>>>(
          x, residual, m, samples, sample_keys);
  if (!L.check()) return L.err;
  const ListItems<Tr> sample{nullptr, sample_keys, samples};
  if (!radix_select<Tr>(L, sample, static_cast<u64>(rank), st)) return L.err;

  // 2. candidates in index order
  const u64 capacity =
      static_cast<u64>(std::min<double>(static_cast<double>(m), 2.0 * candidates + 4096.0));
  const int64_t tile_items = static_cast<int64_t>(kThreads) * kVecsPerThread * W;
  const u64 tiles = static_cast<u64>((m + tile_items - 1) / tile_items);
  u64* cand_indices = L.take<u64>(capacity);
  Key* cand_keys = L.take<Key>(capacity);
  u64* status = L.take<u64>(tiles);
  L.err = cudaMemsetAsync(status, 0, sizeof(u64) * tiles, L.stream);
  if (L.err != cudaSuccess) return L.err;
  topk_candidates_kernel<Tr, kEf><<<L.grid(static_cast<int64_t>(tiles)), kThreads, 0, L.stream>>>(
      x, residual, m, aligned, st, cand_indices, cand_keys, capacity, status, tiles, ctr);
  if (!L.check() || !read_counters(L, ctr, &host)) return L.err;
  if (host.nan_first != ~0ull) {
    *nan_index = static_cast<int64_t>(host.nan_first);
    return cudaSuccess;
  }
  if (!write_back()) return L.err;

  // 3. exact selection among the candidates, or over everything on a miss
  if (host.total >= static_cast<u64>(k) && host.total <= capacity) {
    const ListItems<Tr> list{cand_indices, cand_keys, static_cast<int64_t>(host.total)};
    if (radix_select<Tr>(L, list, static_cast<u64>(k), st))
      select_ordered<Tr, kEf>(L, list, src, st, ctr, a);
  } else {
    const DenseItems<Tr> all{src, m, aligned && is_aligned16(src)};
    if (radix_select<Tr>(L, all, static_cast<u64>(k), st))
      select_ordered<Tr, kEf>(L, all, src, st, ctr, a);
  }
  return L.err;
}

template <class Tr>
cudaError_t run_dtype(const TopkArgs& a, Launch& L, int64_t* nan_index) {
  return a.residual ? run_typed<Tr, true>(a, L, nan_index) : run_typed<Tr, false>(a, L, nan_index);
}

}  // namespace

cudaError_t launch_topk(const TopkArgs& args, const Allocator& alloc, cudaStream_t stream,
                        int64_t* nan_index) {
  *nan_index = -1;
  if (args.m == 0) return cudaSuccess;
  int device = 0;
  Launch L{stream, alloc, 0};
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&L.sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  switch (args.dtype) {
    case FloatType::kFloat32:
      return run_dtype<TF32>(args, L, nan_index);
    case FloatType::kFloat64:
      return run_dtype<TF64>(args, L, nan_index);
    case FloatType::kFloat16:
      return run_dtype<TF16>(args, L, nan_index);
    case FloatType::kBFloat16:
      return run_dtype<TBF16>(args, L, nan_index);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tallytrain
