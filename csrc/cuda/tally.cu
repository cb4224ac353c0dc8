// tally on CUDA: fused unpack + weighted plurality per probe (docs/design.md §3).
// The [P, N] labels are never materialised: symbols are read straight from
// the packed streams.
//
// - P <= 32 peers: one thread per probe. Each thread holds its probe's P
//   symbols (in shared memory, conflict-free) and counts, for each peer q,
//   the weight of the peers r >= q that voted the same class. The first
//   occurrence of a class gets its full count; later occurrences get partial
//   counts that can neither beat the current winner nor raise the runner-up
//   above its true value, so a running top-2 over these counts is exact.
// - P > 32: one warp per probe with a count table of its own: indexed by
//   class when C <= 4096, else an open-addressing hash table sized for
//   min(P, C) distinct classes. Votes for the same class within a warp are
//   combined with __match_any_sync before one atomic per class. A block
//   first stages a run of R probes of all P streams in shared memory
//   (coalesced), when that fits. Tables live in shared memory, or in global
//   memory for very large P and C.
// Counts are integers, so atomics and any combination order give the same
// result: the output is deterministic. Symbols >= num_symbols lower a device
// flag to the smallest position p * n + i, which the binding reads back.
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "launchers.h"
#include "tallytrain/common.h"

namespace tallytrain {
namespace cuda {
namespace {

constexpr int kSmallPeers = 32;
constexpr int kSmallThreads = 256;
constexpr int64_t kDirectMaxClasses = 4096;
constexpr size_t kTableSmemBudget = 48 * 1024;   // all of a block's tables
constexpr size_t kBlockSmemBudget = 72 * 1024;   // tables + staging: 3 blocks per H100 SM
constexpr unsigned long long kEmptyKey = ~0ull;  // no class (classes are < 2**32)
constexpr unsigned long long kNoVote = 1ull << 32;

struct TallyParams {
  const uint8_t* votes;
  int64_t row_bytes;
  int64_t peers;
  int64_t n;
  int64_t num_classes;
  bool abstain;
  uint32_t abstain_symbol;
  int bits;
  int64_t num_symbols;
  bool check_symbols;
  const int64_t* weights;
  int64_t* label;
  int64_t* count;
  int64_t* total;
  int64_t* runner_up;
  unsigned long long* first_bad;
};

// ---- running top-2 over (count, class) -----------------------------------------
// Order: larger count first, then smaller class. c1 < 0 marks "no class yet";
// c2 is the largest count among the classes seen other than cls1.
template <typename CountT>
struct Top2 {
  CountT c1;
  uint32_t cls1;
  CountT c2;
};

template <typename CountT>
__device__ __forceinline__ void top2_init(Top2<CountT>& t) {
  t.c1 = -1;
  t.cls1 = 0;
  t.c2 = 0;
}

template <typename CountT>
__device__ __forceinline__ bool ranks_before(CountT ca, uint32_t a, CountT cb, uint32_t b) {
  return ca > cb || (ca == cb && a < b);
}

// Adds (c, s); s may repeat, with its full count or (see the small-P kernel)
// a partial count after its full count.
template <typename CountT>
__device__ __forceinline__ void top2_push(Top2<CountT>& t, CountT c, uint32_t s) {
  if (t.c1 < 0) {
    t.c1 = c;
    t.cls1 = s;
  } else if (s != t.cls1) {
    if (ranks_before(c, s, t.c1, t.cls1)) {
      t.c2 = max(t.c2, t.c1);
      t.c1 = c;
      t.cls1 = s;
    } else {
      t.c2 = max(t.c2, c);
    }
  }
}

// Merges two top-2 states whose counts are final (a class has the same count
// in both). With distinct winners the runner-up is max(winner's c2, loser's
// c1): the loser's c2 never exceeds its c1.
template <typename CountT>
__device__ __forceinline__ Top2<CountT> top2_merge(const Top2<CountT>& a, const Top2<CountT>& b) {
  if (b.c1 < 0) return a;
  if (a.c1 < 0) return b;
  Top2<CountT> r;
  if (a.cls1 == b.cls1) {
    r = a;
    r.c2 = max(a.c2, b.c2);
  } else if (ranks_before(a.c1, a.cls1, b.c1, b.cls1)) {
    r = a;
    r.c2 = max(a.c2, b.c1);
  } else {
    r = b;
    r.c2 = max(b.c2, a.c1);
  }
  return r;
}

template <typename CountT>
__device__ __forceinline__ void write_probe(const TallyParams& p, int64_t i, const Top2<CountT>& t,
                                            CountT total) {
  const bool none = total == 0;  // every peer abstained or weighs 0
  p.label[i] = none ? -1 : static_cast<int64_t>(t.cls1);
  p.count[i] = none ? 0 : static_cast<int64_t>(t.c1);
  p.runner_up[i] = none ? 0 : static_cast<int64_t>(t.c2);
  p.total[i] = static_cast<int64_t>(total);
}

// Classifies symbol s of peer q at probe i: true for a vote that counts.
__device__ __forceinline__ bool is_vote(const TallyParams& p, uint32_t s, int64_t q, int64_t i,
                                        bool report) {
  if (p.check_symbols && static_cast<int64_t>(s) >= p.num_symbols) {
    if (report) atomicMin(p.first_bad, static_cast<unsigned long long>(q * p.n + i));
    return false;
  }
  return !(p.abstain && s == p.abstain_symbol);
}

// ---- P <= 32: one thread per probe ---------------------------------------------------
template <typename CountT>
__global__ void __launch_bounds__(kSmallThreads) tally_small_kernel(TallyParams p) {
  __shared__ uint32_t sym[kSmallPeers * kSmallThreads];
  __shared__ CountT weight[kSmallPeers];
  if (threadIdx.x < p.peers)
    weight[threadIdx.x] = p.weights ? static_cast<CountT>(p.weights[threadIdx.x]) : CountT(1);
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSmallThreads + threadIdx.x;
  if (i >= p.n) return;
  uint32_t* my = sym + threadIdx.x;  // my[q * kSmallThreads]: peer q's symbol
  uint32_t votes = 0;                // bit q: peer q's symbol is a vote
  CountT total = 0;
  for (int q = 0; q < p.peers; ++q) {
    const uint32_t s = read_symbol_exact(p.votes + q * p.row_bytes, i, p.bits);
    my[q * kSmallThreads] = s;
    if (is_vote(p, s, q, i, true)) {
      votes |= 1u << q;
      total += weight[q];
    }
  }
  Top2<CountT> t;
  top2_init(t);
  for (int q = 0; q < p.peers; ++q) {
    if (!((votes >> q) & 1u)) continue;
    const uint32_t s = my[q * kSmallThreads];
    CountT c = weight[q];
    for (int r = q + 1; r < p.peers; ++r)
      if (((votes >> r) & 1u) && my[r * kSmallThreads] == s) c += weight[r];
    top2_push(t, c, s);
  }
  write_probe(p, i, t, total);
}

// ---- P > 32: one warp per probe ----------------------------------------------------------
struct LargePlan {
  int run;                       // probes per run (a multiple of 8)
  int stage_words;               // 32-bit words per staged stream row (odd: no bank conflicts)
  size_t stage_bytes;            // offset of the tables in shared memory (16-aligned)
  size_t table_bytes;            // one warp's table (16-aligned)
  int hash_bits;                 // log2 of the hash table's slots
  unsigned char* global_tables;  // nullptr: tables in shared memory
};

__device__ __forceinline__ uint32_t hash_slot(uint32_t s, int hash_bits) {
  return (s * 0x9E3779B1u) >> (32 - hash_bits);
}

template <typename CountT>
__device__ __forceinline__ CountT warp_sum(CountT v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename CountT, bool kDirect, bool kStaged>
__global__ void __launch_bounds__(256) tally_large_kernel(TallyParams p, LargePlan plan) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t peers = p.peers;
  const int64_t iters = (peers + 31) / 32;
  const int b = p.bits;
  const uint64_t symbol_mask = (uint64_t(1) << b) - 1;
  const uint32_t* stage = reinterpret_cast<const uint32_t*>(smem);

  unsigned char* table =
      plan.global_tables
          ? plan.global_tables + (static_cast<size_t>(blockIdx.x) * warps + warp) * plan.table_bytes
          : smem + plan.stage_bytes + static_cast<size_t>(warp) * plan.table_bytes;
  const uint32_t slots = kDirect ? static_cast<uint32_t>(p.num_classes) : (1u << plan.hash_bits);
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(table);
  CountT* counts =
      kDirect ? reinterpret_cast<CountT*>(table) : reinterpret_cast<CountT*>(keys + slots);
  for (uint32_t k = lane; k < slots; k += 32) {
    if (!kDirect) keys[k] = kEmptyKey;
    counts[k] = 0;
  }
  __syncwarp();

  const int64_t runs = (p.n + plan.run - 1) / plan.run;
  for (int64_t run = blockIdx.x; run < runs; run += gridDim.x) {
    const int64_t i0 = run * plan.run;
    const int rn = static_cast<int>(p.n - i0 < plan.run ? p.n - i0 : plan.run);
    if (kStaged) {
      // The run's bits start on a byte boundary: i0 is a multiple of 8.
      const int64_t byte_lo = i0 * b / 8;
      const int nb = static_cast<int>((static_cast<int64_t>(rn) * b + 7) / 8);
      const int row_len = plan.stage_words * 4;
      for (int64_t q = warp; q < peers; q += warps) {
        const uint8_t* src = p.votes + q * p.row_bytes + byte_lo;
        uint8_t* dst = reinterpret_cast<uint8_t*>(smem) + static_cast<size_t>(q) * row_len;
        for (int jb = lane; jb < row_len; jb += 32) dst[jb] = jb < nb ? src[jb] : uint8_t(0);
      }
      __syncthreads();
    }
    for (int j = warp; j < rn; j += warps) {
      const int64_t i = i0 + j;
      // Peer q's symbol at probe i.
      auto fetch = [&](int64_t q) -> uint32_t {
        if (kStaged) {
          const uint32_t* row = stage + static_cast<size_t>(q) * plan.stage_words;
          const int bit = j * b;
          const uint64_t two = (static_cast<uint64_t>(row[(bit >> 5) + 1]) << 32) | row[bit >> 5];
          return static_cast<uint32_t>((two >> (bit & 31)) & symbol_mask);
        }
        return read_symbol_exact(p.votes + q * p.row_bytes, i, b);
      };
      auto weight_of = [&](int64_t q) -> CountT {
        return p.weights ? static_cast<CountT>(__ldg(p.weights + q)) : CountT(1);
      };

      // 1. add every vote's weight to its class's counter
      CountT total = 0;
      for (int64_t it = 0; it < iters; ++it) {
        const int64_t q = it * 32 + lane;
        unsigned long long key = kNoVote;
        uint32_t s = 0;
        CountT w = 0;
        if (q < peers) {
          s = fetch(q);
          if (is_vote(p, s, q, i, true)) {
            w = weight_of(q);
            total += w;
            if (w != 0) key = s;
          }
        }
        const unsigned group = __match_any_sync(0xffffffffu, key);
        CountT group_weight;
        if constexpr (sizeof(CountT) == 4) {
          group_weight = static_cast<CountT>(__reduce_add_sync(group, static_cast<unsigned>(w)));
        } else {
          __shared__ CountT scratch[8][32];
          scratch[warp][lane] = w;
          __syncwarp();
          group_weight = 0;
          for (unsigned m = group; m != 0; m &= m - 1) group_weight += scratch[warp][__ffs(m) - 1];
          __syncwarp();
        }
        if (key != kNoVote && lane == __ffs(group) - 1) {
          uint32_t slot = s;
          if (!kDirect) {
            slot = hash_slot(s, plan.hash_bits);
            for (;;) {
              const unsigned long long prev = atomicCAS(keys + slot, kEmptyKey, key);
              if (prev == kEmptyKey || prev == key) break;
              slot = (slot + 1) & (slots - 1);
            }
          }
          if constexpr (sizeof(CountT) == 4) {
            atomicAdd(reinterpret_cast<int*>(counts + slot), static_cast<int>(group_weight));
          } else {
            atomicAdd(reinterpret_cast<unsigned long long*>(counts + slot),
                      static_cast<unsigned long long>(group_weight));
          }
        }
      }
      __syncwarp();

      // 2. each lane ranks the final counts of its votes' classes
      Top2<CountT> t;
      top2_init(t);
      for (int64_t it = 0; it < iters; ++it) {
        const int64_t q = it * 32 + lane;
        if (q >= peers) break;
        const uint32_t s = fetch(q);
        if (!is_vote(p, s, q, i, false) || weight_of(q) == 0) continue;
        uint32_t slot = s;
        if (!kDirect) {
          slot = hash_slot(s, plan.hash_bits);
          while (keys[slot] != s) slot = (slot + 1) & (slots - 1);
        }
        top2_push(t, counts[slot], s);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        Top2<CountT> o;
        o.c1 = __shfl_xor_sync(0xffffffffu, t.c1, offset);
        o.cls1 = __shfl_xor_sync(0xffffffffu, t.cls1, offset);
        o.c2 = __shfl_xor_sync(0xffffffffu, t.c2, offset);
        t = top2_merge(t, o);
      }
      total = warp_sum(total);
      __syncwarp();

      // 3. reset the table for the next probe
      if (kDirect) {
        for (int64_t it = 0; it < iters; ++it) {
          const int64_t q = it * 32 + lane;
          if (q >= peers) break;
          const uint32_t s = fetch(q);
          if (is_vote(p, s, q, i, false)) counts[s] = 0;
        }
      } else {
        for (uint32_t k = lane; k < slots; k += 32) {
          keys[k] = kEmptyKey;
          counts[k] = 0;
        }
      }
      __syncwarp();
      if (lane == 0) write_probe(p, i, t, total);
    }
    if (kStaged) __syncthreads();  // the next run overwrites the staging buffer
  }
}

// ---- host side ---------------------------------------------------------------------------
size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

template <typename CountT, bool kDirect, bool kStaged>
cudaError_t launch_large(const TallyParams& p, LargePlan plan, int warps, bool global_tables,
                         const Allocator& alloc, cudaStream_t stream) {
  auto kernel = tally_large_kernel<CountT, kDirect, kStaged>;
  const size_t smem = plan.stage_bytes + (global_tables ? 0 : warps * plan.table_bytes);
  cudaError_t err = cudaSuccess;
  if (smem > 48 * 1024)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
  int device = 0, sms = 0, per_sm = 0;
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, smem);
  if (err != cudaSuccess) return err;
  const int64_t runs = (p.n + plan.run - 1) / plan.run;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(runs, int64_t(per_sm) * sms));
  if (global_tables)
    plan.global_tables =
        static_cast<unsigned char*>(alloc(static_cast<size_t>(blocks) * warps * plan.table_bytes));
  kernel<<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(p, plan);
  return cudaGetLastError();
}

template <typename CountT>
cudaError_t launch_counted(const TallyArgs& a, const TallyParams& p, const Allocator& alloc,
                           cudaStream_t stream) {
  if (a.peers <= kSmallPeers) {
    const int64_t blocks = (a.n + kSmallThreads - 1) / kSmallThreads;
    tally_small_kernel<CountT><<<static_cast<unsigned>(blocks), kSmallThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  // One table per warp: by class for small C, else hashed with >= 2 slots
  // per distinct class a probe can have.
  const int64_t classes = a.num_classes;
  const bool direct = classes <= kDirectMaxClasses;
  LargePlan plan{};
  plan.hash_bits = 6;
  while (plan.hash_bits < 31 &&
         (int64_t(1) << plan.hash_bits) < 2 * std::min<int64_t>(a.peers, classes))
    ++plan.hash_bits;
  plan.table_bytes = align16(direct ? static_cast<size_t>(classes) * sizeof(CountT)
                                    : (size_t(1) << plan.hash_bits) *
                                          (sizeof(unsigned long long) + sizeof(CountT)));
  int warps = 8;
  while (warps > 1 && warps * plan.table_bytes > kTableSmemBudget) warps /= 2;
  const bool global_tables = warps * plan.table_bytes > kTableSmemBudget;
  if (global_tables) warps = 8;
  const size_t table_smem = global_tables ? 0 : warps * plan.table_bytes;
  // Stage the longest run of probes (a multiple of 8, so that it starts on a
  // byte) whose P stream slices fit beside the tables.
  for (int run = 128; run >= 8; run /= 2) {
    const int words = ((run * a.bits + 31) / 32 + 1) | 1;
    const size_t bytes = align16(static_cast<size_t>(a.peers) * words * 4);
    if (bytes + table_smem <= kBlockSmemBudget) {
      plan.run = run;
      plan.stage_words = words;
      plan.stage_bytes = bytes;
      break;
    }
  }
  if (plan.run == 0) {  // too many peers to stage: read the streams directly
    plan.run = 32;
    return direct
               ? launch_large<CountT, true, false>(p, plan, warps, global_tables, alloc, stream)
               : launch_large<CountT, false, false>(p, plan, warps, global_tables, alloc, stream);
  }
  return direct ? launch_large<CountT, true, true>(p, plan, warps, global_tables, alloc, stream)
                : launch_large<CountT, false, true>(p, plan, warps, global_tables, alloc, stream);
}

}  // namespace

cudaError_t launch_tally(const TallyArgs& a, const Allocator& alloc, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  TallyParams p;
  p.votes = a.votes;
  p.row_bytes = packed_bytes(a.n, a.bits);
  p.peers = a.peers;
  p.n = a.n;
  p.num_classes = a.num_classes;
  p.abstain = a.abstain;
  p.abstain_symbol = static_cast<uint32_t>(a.num_classes);
  p.bits = a.bits;
  p.num_symbols = a.num_symbols;
  p.check_symbols = (int64_t(1) << a.bits) != a.num_symbols;
  p.weights = a.weights;
  p.label = a.label;
  p.count = a.count;
  p.total = a.total;
  p.runner_up = a.runner_up;
  p.first_bad = a.first_bad;
  return a.wide_counts ? launch_counted<long long>(a, p, alloc, stream)
                       : launch_counted<int>(a, p, alloc, stream);
}

}  // namespace cuda
}  // namespace tallytrain
