// tally on the CPU: weighted plurality vote per probe over P packed vote
// streams (docs/design.md §3). Symbols are unpacked inside the tally, a block of
// probes at a time; the P x N labels never exist in memory.
//
// Work is split over blocks of probes. For each block every peer's stream is
// read sequentially into a small tile (one row per peer), then the block is
// counted by one of four strategies, chosen from the number of classes C:
//
//  - tiny C (<= kTinyMaxClasses): for each class, compare a vector of probes'
//    symbols with the class and add, peer by peer; counts live in registers,
//    so there is no scatter;
//  - class-major (C up to 16 P, or up to 128): counts[c][probe]
//    for the whole block, one scatter increment per vote, then winner and
//    runner-up by a branch-free vector scan over the classes (which also
//    zeroes the counts for the next block);
//  - per-probe table (b <= kTableMaxBits): a (count, class) key per symbol
//    for one probe, reset only where touched; 4 probes side by side, each in
//    a table of its own, where the tables fit in L2. Counts only grow, so
//    the running maximum of the keys over the increments is the winner; more
//    passes over the probe's votes read the runner-up, then reset;
//  - sort (larger C, where a table per thread would not fit in cache, or
//    weights too large for the packed keys): sort the probe's votes by class
//    and count runs.
//
// The vector strategies count in 16-bit lanes while the summed weight fits
// (else 32-bit), in vectors of the CPU level's width, and run at the level
// chosen at run time (simd.h); the table and sort strategies are scalar, the
// same at every level, and only unpack at the level's. Symbols >= C (abstain,
// or out of range) are never counted as a class; an out-of-range symbol (>=
// the number of symbols) records its position, and the error is raised once
// the tally is done. Each strategy is kept out of line so that its loops get
// the registers. Counts are integers, so every strategy, level and thread
// split gives the same answer; ties go to the smallest class. Per-probe
// weight sums are assumed to stay below 2^63 (int64 outputs).
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "simd.h"

namespace tallytrain {
namespace cpu {
namespace {

using namespace simd;

// Tiny-C counting costs C vector compares per peer and vector of probes.
constexpr int64_t kTinyMaxClasses = 32;
constexpr int kTinyMaxBits = 6;  // bits_for(kTinyMaxClasses + 1)
// Class-major counting scans all classes per probe: worth it (measured) while
// C is small next to the number of votes per probe, or small outright, and
// while the block of counts stays in cache.
constexpr int64_t kClassMajorMaxClasses = 4096;
constexpr int64_t kClassMajorClassesPerVote = 16;
constexpr int64_t kClassMajorAlwaysClasses = 128;
constexpr int kClassMajorMaxBits = 13;  // bits_for(kClassMajorMaxClasses + 1)
// The per-probe table has one entry per possible symbol (2^b); larger tables
// leave the caches, and sorting the P votes of a probe is cheaper.
constexpr int kTableMaxBits = 20;
// Bytes of tile / count block that should stay in the L1/L2 caches.
constexpr int64_t kTileBytes = 32 * 1024;
constexpr int64_t kClassMajorBytes = 128 * 1024;

struct Problem {
  const uint8_t* votes;  // [P, nbytes]
  int64_t peers, nbytes, n;
  int b;
  uint64_t num_classes;    // C; symbols >= C are ignored (abstain) or invalid
  uint64_t num_symbols;    // C or C + 1
  const int64_t* weights;  // [P] (>= 0), or nullptr for all ones
  uint64_t weight_sum;     // summed weight of all peers
};

struct Outputs {
  int64_t *label, *count, *total, *runner_up;
};

// ---- unpacking ------------------------------------------------------------------ //
// Everything here is compiled for the CPU level S of the strategy that
// unpacks (simd.h).

// Stores the 16 bytes of v as 16 Out (2 or 4 bytes) at out: interleaved
// with zeros (little-endian), one instruction per step at every level, where
// __builtin_convertvector went byte by byte. One store per register: two
// stores read back as one wider load stall (store forwarding fails).
template <typename Out>
TT_INLINE void store_widened(const Vec<uint8_t, 16>& v, Out* out) {
  using U8 = Vec<uint8_t, 16>;
  using U16 = Vec<uint16_t, 16>;
  const U8 zero = {};
  const U16 low =
      (U16)__builtin_shufflevector(v, zero, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const U16 high = (U16)__builtin_shufflevector(v, zero, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13,
                                                29, 14, 30, 15, 31);
  if constexpr (sizeof(Out) == 2) {
    memcpy(out, &low, sizeof(U16));
    memcpy(out + 8, &high, sizeof(U16));
  } else {
    static_assert(sizeof(Out) == 4, "16- or 32-bit lanes");
    using U32 = Vec<uint32_t, 16>;
    const U16 zero16 = {};
    const U16 words[2] = {low, high};
    for (int h = 0; h < 2; ++h) {
      const U32 a = (U32)__builtin_shufflevector(words[h], zero16, 0, 8, 1, 9, 2, 10, 3, 11);
      const U32 b = (U32)__builtin_shufflevector(words[h], zero16, 4, 12, 5, 13, 6, 14, 7, 15);
      memcpy(out + 8 * h, &a, sizeof(U32));
      memcpy(out + 8 * h + 4, &b, sizeof(U32));
    }
  }
}

// Symbols [j, j + 16 * 8 / B) from 16 bytes at src, B in {1, 2, 4}: the B-bit
// fields of every byte, each shifted down in all bytes at once, then put in
// stream order by rounds of byte interleaving (the fields of byte i end up
// at 8/B * i, lowest first). SSE2 has all of it; 16-byte vectors at every
// level (one interleave is one instruction on 16 bytes).
template <int B, typename Out>
TT_INLINE void unpack_fields_of_16_bytes(const uint8_t* src, Out* out) {
  using U8 = Vec<uint8_t, 16>;
  constexpr int kFields = 8 / B;
  const U8 bytes = load<U8>(src);
  U8 v[kFields];
  for (int k = 0; k < kFields; ++k) v[k] = (bytes >> uint8_t(k * B)) & uint8_t((1 << B) - 1);
  for (int half = kFields / 2; half >= 1; half /= 2) {
    U8 next[kFields];
    for (int k = 0; k < kFields / 2; ++k) {
      next[2 * k] = __builtin_shufflevector(v[k], v[k + kFields / 2], 0, 16, 1, 17, 2, 18, 3, 19, 4,
                                            20, 5, 21, 6, 22, 7, 23);
      next[2 * k + 1] = __builtin_shufflevector(v[k], v[k + kFields / 2], 8, 24, 9, 25, 10, 26, 11,
                                                27, 12, 28, 13, 29, 14, 30, 15, 31);
    }
    for (int k = 0; k < kFields; ++k) v[k] = next[k];
  }
  for (int k = 0; k < kFields; ++k) store_widened(v[k], out + 16 * k);
}

// Symbols of up to kWindowMaxBits bits by 32-bit windows: symbol k of a
// group of 8 (B bytes) lies within the 4 bytes from byte kB/8, kB%8 bits in,
// so one byte shuffle (pshufb: SSSE3, so v2 and up) puts every symbol's
// window in a lane, and a per-lane shift and a mask finish: one variable
// shift at v3 and v4 (8 lanes, one register), a multiply by 2^(8 - kB%8)
// and a shift by 8 at v2 (4 lanes a register; SSE4.1's pmulld), which keeps
// the symbol while B + 8 <= 32.
constexpr int kWindowMaxBits = 24;

// Byte i of the windows of symbols kFirst + i/4 (four bytes each), from 16
// bytes loaded at the byte where symbol kFirst starts.
template <int B, int kFirst>
constexpr int window_byte(int i) {
  const int k = kFirst + i / 4;
  return k * B / 8 - kFirst * B / 8 + i % 4;
}

template <int B, int kFirst, size_t... I>
TT_INLINE Vec<uint32_t, 16> window_lanes(const uint8_t* group, std::index_sequence<I...>) {
  using U8 = Vec<uint8_t, 16>;
  const U8 bytes = load<U8>(group + kFirst * B / 8);
  return (Vec<uint32_t, 16>)__builtin_shufflevector(bytes, bytes, window_byte<B, kFirst>(I)...);
}

template <class S, int B, typename Out>
TT_INLINE void window_symbols(const uint8_t* group, Out* out) {
  constexpr uint32_t kMask = (uint32_t(1) << B) - 1;
  using W4 = Vec<uint32_t, 16>;
  const auto bytes16 = std::make_index_sequence<16>();
  const W4 first = window_lanes<B, 0>(group, bytes16);
  const W4 second = window_lanes<B, 4>(group, bytes16);
  constexpr int o0 = 0, o1 = B % 8, o2 = 2 * B % 8, o3 = 3 * B % 8;
  constexpr int o4 = 4 * B % 8, o5 = 5 * B % 8, o6 = 6 * B % 8, o7 = 7 * B % 8;
  if constexpr (S::kLevel >= Level::kV3) {
    using W8 = Vec<uint32_t, 32>;
    constexpr W8 kShift = {o0, o1, o2, o3, o4, o5, o6, o7};
    const W8 lanes = __builtin_shufflevector(first, second, 0, 1, 2, 3, 4, 5, 6, 7);
    const W8 symbols = (lanes >> kShift) & kMask;
    using O = Vec<Out, int(8 * sizeof(Out))>;
    const O v = __builtin_convertvector(symbols, O);
    memcpy(out, &v, sizeof(O));
  } else {
    constexpr W4 kUp0 = {1u << (8 - o0), 1u << (8 - o1), 1u << (8 - o2), 1u << (8 - o3)};
    constexpr W4 kUp1 = {1u << (8 - o4), 1u << (8 - o5), 1u << (8 - o6), 1u << (8 - o7)};
    const W4 symbols[2] = {((first * kUp0) >> 8) & kMask, ((second * kUp1) >> 8) & kMask};
    using O = Vec<Out, int(4 * sizeof(Out))>;
    for (int h = 0; h < 2; ++h) {
      const O v = __builtin_convertvector(symbols[h], O);
      memcpy(out + 4 * h, &v, sizeof(O));
    }
  }
}

// Symbols of 3 to 15 bits at the SSE2 baseline, which has no byte shuffle
// for the windows above: two groups of 8 symbols (B bytes each) at a time,
// each group in a 64-bit lane: B <= 8, one word holds the whole group; B > 8,
// its first 8 bytes and its last 8, one of which holds each symbol whole
// (a symbol runs past the first word only from bit 64 - B on, which the last
// word, from bit 8B - 64 <= 64 - B, covers while B <= 16). Every shift is a
// constant, the same in both lanes (psrlq), and 64-bit interleaves put the
// symbols in stream order.
constexpr int kPairMaxBits = 15;

template <int B, typename Out>
TT_INLINE void pair_symbols(const uint8_t* groups, Out* out) {
  static_assert(B <= kPairMaxBits, "symbols must lie whole in one of the two words");
  using U64 = Vec<uint64_t, 16>;
  constexpr uint64_t kMask = (uint64_t(1) << B) - 1;
  const auto word = [&](int at) {
    uint64_t w;
    memcpy(&w, groups + at, 8);
    return w;
  };
  const U64 first = {word(0), word(B)};
  const U64 last = B > 8 ? U64{word(B - 8), word(2 * B - 8)} : first;
  U64 symbol[8];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    const bool from_last = B > 8 && k * B + B > 64;
    const int shift = from_last ? k * B - (8 * B - 64) : k * B;
    symbol[k] = ((from_last ? last : first) >> shift) & kMask;
  }
  if constexpr (sizeof(Out) == 2) {
    // Four symbols of each group in a lane, then group 0's lanes together.
    const U64 a = symbol[0] | symbol[1] << 16 | symbol[2] << 32 | symbol[3] << 48;
    const U64 b = symbol[4] | symbol[5] << 16 | symbol[6] << 32 | symbol[7] << 48;
    const U64 group0 = __builtin_shufflevector(a, b, 0, 2);
    const U64 group1 = __builtin_shufflevector(a, b, 1, 3);
    memcpy(out, &group0, 16);
    memcpy(out + 8, &group1, 16);
  } else {
    static_assert(sizeof(Out) == 4, "16- or 32-bit lanes");
#pragma GCC unroll 2
    for (int k = 0; k < 8; k += 4) {
      const U64 a = symbol[k] | symbol[k + 1] << 32;
      const U64 b = symbol[k + 2] | symbol[k + 3] << 32;
      const U64 group0 = __builtin_shufflevector(a, b, 0, 2);
      const U64 group1 = __builtin_shufflevector(a, b, 1, 3);
      memcpy(out + k, &group0, 16);
      memcpy(out + 8 + k, &group1, 16);
    }
  }
}

// Symbols [i0, i0 + len) of a stream of B-bit symbols into out[0, len). i0 is
// a multiple of 8, so each group of 8 symbols starts on a byte boundary B
// bytes after the previous one and every shift is a compile-time constant.
template <class S, int B, typename Out>
TT_INLINE void unpack_fixed(const uint8_t* stream, int64_t nbytes, int64_t i0, int64_t len,
                            Out* out) {
  constexpr uint64_t kMask = (uint64_t(1) << B) - 1;
  constexpr int64_t kReach = B <= 8 ? 8 : (7 * B) / 8 + 8;  // bytes a group's loads touch
  const uint8_t* src = stream + i0 / 8 * B;
  const int64_t avail = nbytes - i0 / 8 * B;
  int64_t j = 0;
  if constexpr (B == 8 || B == 16) {
    // Whole bytes per symbol (a little-endian stream, as the 64-bit loads
    // below also assume): a widening copy that the compiler vectorises.
    using Word = std::conditional_t<B == 8, uint8_t, uint16_t>;
    const int64_t whole = std::min(len, avail / int64_t(sizeof(Word)));
    for (; j < whole; ++j) {
      Word w;
      memcpy(&w, src + j * int64_t(sizeof(Word)), sizeof(Word));
      out[j] = static_cast<Out>(w);
    }
  } else if constexpr (B == 1 || B == 2 || B == 4) {
    constexpr int64_t kSymbols = 16 * 8 / B;  // from 16 bytes
    for (; j + kSymbols <= len && j / 8 * B + 16 <= avail; j += kSymbols)
      unpack_fields_of_16_bytes<B, Out>(src + j / 8 * B, out + j);
  } else if constexpr (B <= kWindowMaxBits && S::kLevel >= Level::kV2) {
    // Any width up to 24 bits from SSSE3 on: each symbol from the 32-bit
    // window at its first byte (see window_symbols), 8 a step.
    constexpr int64_t kWindowReach = 4 * B / 8 + 16;  // bytes a group's loads touch
    for (; j + 8 <= len && j / 8 * B + kWindowReach <= avail; j += 8)
      window_symbols<S, B>(src + j / 8 * B, out + j);
  } else if constexpr (B <= kPairMaxBits && S::kLevel == Level::kBaseline) {
    // The other widths below 16 bits at the baseline (and on aarch64): two
    // groups a step (see pair_symbols).
    constexpr int64_t kPairReach = B <= 8 ? B + 8 : 2 * B;  // bytes a step's loads touch
    for (; j + 16 <= len && j / 8 * B + kPairReach <= avail; j += 16)
      pair_symbols<B>(src + j / 8 * B, out + j);
  } else {
    for (; j + 8 <= len && j / 8 * B + kReach <= avail; j += 8) {
      const uint8_t* group = src + j / 8 * B;
      if constexpr (B <= 8) {  // one load holds the whole group
        uint64_t word;
        memcpy(&word, group, 8);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) out[j + k] = static_cast<Out>((word >> (k * B)) & kMask);
      } else {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          uint64_t word;
          memcpy(&word, group + (k * B >> 3), 8);
          out[j + k] = static_cast<Out>((word >> ((k * B) & 7)) & kMask);
        }
      }
    }
  }
  for (; j < len; ++j) out[j] = static_cast<Out>(read_symbol(stream, nbytes, i0 + j, B));
}

// unpack_fixed for a run-time b in [B, kMaxBits].
template <class S, typename Out, int kMaxBits, int B = 1>
TT_INLINE void unpack_bits(int b, const uint8_t* stream, int64_t nbytes, int64_t i0, int64_t len,
                           Out* out) {
  if (b == B) return unpack_fixed<S, B, Out>(stream, nbytes, i0, len, out);
  if constexpr (B < kMaxBits)
    return unpack_bits<S, Out, kMaxBits, B + 1>(b, stream, nbytes, i0, len, out);
  TORCH_INTERNAL_ASSERT(false, "unpack_bits: ", b, " bits is outside 1..", kMaxBits);
}

// Whether any of v[0, len) is >= limit (which fits in Out). A max
// reduction, which vectorises at every level (an OR of comparisons stayed
// scalar for 16-bit lanes).
template <typename Out>
TT_INLINE bool any_at_least(const Out* v, int64_t len, Out limit) {
  Out top = 0;  // symbols are >= 0
  for (int64_t j = 0; j < len; ++j) top = std::max(top, v[j]);
  return top >= limit;
}

// Unpacks symbols [i0, i0 + len) of peer p's stream (i0 a multiple of 8) into
// out[0, len). If the range holds a symbol >= num_symbols (possible only when
// num_symbols < 2^b), the flat position (p * n + i) of the first lowers
// *first_bad.
template <class S, typename Out, int kMaxBits = 32>
TT_INLINE void unpack_block(const Problem& pr, int64_t p, int64_t i0, int64_t len, Out* out,
                            int64_t* first_bad) {
  const uint8_t* stream = pr.votes + p * pr.nbytes;
  unpack_bits<S, Out, kMaxBits>(pr.b, stream, pr.nbytes, i0, len, out);
  if (pr.num_symbols < (uint64_t(1) << pr.b) &&
      __builtin_expect(any_at_least(out, len, static_cast<Out>(pr.num_symbols)), 0)) {
    const int64_t j =
        std::find_if(out, out + len,
                     [&](Out v) { return static_cast<uint64_t>(v) >= pr.num_symbols; }) -
        out;
    *first_bad = std::min(*first_bad, p * pr.n + i0 + j);
  }
}

// unpack_block as a kernel of its own, for the scalar strategies (table,
// sort), which run the same code at every level but unpack at the level's.
template <int kMaxBits>
struct UnpackBlock {
  template <class S>
  static TT_INLINE void run(const Problem* pr, int64_t p, int64_t i0, int64_t len, uint32_t* out,
                            int64_t* first_bad) {
    unpack_block<S, uint32_t, kMaxBits>(*pr, p, i0, len, out, first_bad);
  }
};

inline uint64_t weight_of(const Problem& pr, int64_t p) {
  return pr.weights ? static_cast<uint64_t>(pr.weights[p]) : 1;
}

// Writes probe i's result. The winner is meaningful only when total > 0.
inline void store(const Outputs& out, int64_t i, uint64_t total, uint32_t winner, uint64_t count,
                  uint64_t runner_up) {
  const bool none = total == 0;
  out.label[i] = none ? -1 : static_cast<int64_t>(winner);
  out.count[i] = none ? 0 : static_cast<int64_t>(count);
  out.total[i] = static_cast<int64_t>(total);
  out.runner_up[i] = none ? 0 : static_cast<int64_t>(runner_up);
}

// ---- vector strategies: tiny C and class-major -------------------------------- //
// Both hold counts for a vector of probes (one per lane, one register of the
// level S) and reduce over the classes with branch-free vector code.

// Winner, count, runner-up and total of a vector of probes (one per lane)
// from their counts, class by class in increasing order. Strictly greater
// keeps the smallest class on ties; a class with count 0 never beats a
// winner with positive support. The top two by max and min (counts are >= 0:
// signed lanes): one select per class, for the winner, where choosing them
// took four.
template <typename V>
struct ClassScan {
  V best = {}, second = {}, winner = {}, total = {}, cls = {};

  TT_INLINE void add(const V& count) {
    total += count;
    second = vmax(second, vmin(count, best));
    winner = count > best ? cls : winner;
    best = vmax(best, count);
    cls += 1;
  }

  // Writes probes [first, first + len), len <= lanes.
  TT_INLINE void store_to(const Outputs& out, int64_t first, int64_t len) const {
    for (int64_t l = 0; l < len; ++l)
      store(out, first + l, static_cast<uint64_t>(total[l]), static_cast<uint32_t>(winner[l]),
            static_cast<uint64_t>(best[l]), static_cast<uint64_t>(second[l]));
  }
};

// Tiny C: probes [j0, j0 + len) from tile[p * block + j] (symbols; those >=
// C match no class). Each class's counts are summed from vector compares, so
// they never leave the registers, kClassesPerPass classes per pass over the
// peers (each symbol vector loaded once for all of them: a load and the
// loop's overhead were most of a compare's cost). `weights` is null for
// unweighted votes.
constexpr int kClassesPerPass = 4;

template <class S, typename Lane>
TT_INLINE void tiny_count(const Lane* tile, int64_t block, int64_t peers, Lane classes,
                          const Lane* weights, int64_t j0, int64_t len, const Outputs& out) {
  using V = Vec<Lane, S::kBytes>;
  constexpr int64_t kLanes = S::kBytes / sizeof(Lane);
  for (int64_t j = 0; j < len; j += kLanes) {
    ClassScan<V> scan;
    for (Lane c0 = 0; c0 < classes; c0 += kClassesPerPass) {
      V count[kClassesPerPass] = {};
      for (int64_t p = 0; p < peers; ++p) {
        const V sym = load<V>(tile + p * block + j);
        for (int q = 0; q < kClassesPerPass; ++q) {
          const V match = sym == Lane(c0 + q);
          if (weights)
            count[q] += match & weights[p];
          else
            count[q] -= match;  // a true comparison is -1
        }
      }
      for (int q = 0; q < kClassesPerPass && c0 + q < classes; ++q) scan.add(count[q]);
    }
    scan.store_to(out, j0 + j, std::min(kLanes, len - j));
  }
}

// Class-major: probes [j0, j0 + len) from counts[c * block + j].
template <class S, typename Lane>
TT_INLINE void class_major_reduce(Lane* counts, int64_t block, Lane classes, int64_t j0,
                                  int64_t len, const Outputs& out) {
  using V = Vec<Lane, S::kBytes>;
  constexpr int64_t kLanes = S::kBytes / sizeof(Lane);
  for (int64_t j = 0; j < len; j += kLanes) {
    ClassScan<V> scan;
    for (Lane c = 0; c < classes; ++c) {
      // Each count is read once here, so it is zeroed for the next block in
      // the same pass instead of by a separate fill of the whole block.
      scan.add(load<V>(counts + c * block + j));
      const V zero = {};
      memcpy(counts + c * block + j, &zero, sizeof(V));
    }
    scan.store_to(out, j0 + j, std::min(kLanes, len - j));
  }
}

// Lane-wide copies of the weights (which fit: their sum does), or none.
template <typename Lane>
std::vector<Lane> lane_weights(const Problem& pr) {
  return pr.weights ? std::vector<Lane>(pr.weights, pr.weights + pr.peers) : std::vector<Lane>();
}

// The tiny strategy over probes [i0, i1), compiled for each level (simd.h).
template <typename Lane>
struct TinyTally {
  template <class S>
  static TT_INLINE void run(const Problem* pr_, const Outputs* out_, int64_t block, int64_t i0,
                            int64_t i1, int64_t* first_bad) {
    const Problem& pr = *pr_;
    std::vector<Lane> tile(pr.peers * block);  // [P][block]
    const std::vector<Lane> w = lane_weights<Lane>(pr);
    const Lane classes = static_cast<Lane>(pr.num_classes);
    for (int64_t j0 = i0; j0 < i1; j0 += block) {
      const int64_t len = std::min(block, i1 - j0);
      for (int64_t p = 0; p < pr.peers; ++p)
        unpack_block<S, Lane, kTinyMaxBits>(pr, p, j0, len, tile.data() + p * block, first_bad);
      tiny_count<S, Lane>(tile.data(), block, pr.peers, classes, pr.weights ? w.data() : nullptr,
                          j0, len, *out_);
    }
  }
};

// counts[c][probe] for a block of probes; row C collects the ignored votes.
template <typename Lane>
struct ClassMajorTally {
  template <class S>
  static TT_INLINE void run(const Problem* pr_, const Outputs* out_, int64_t block, int64_t i0,
                            int64_t i1, int64_t* first_bad) {
    const Problem& pr = *pr_;
    const Lane classes = static_cast<Lane>(pr.num_classes);
    const uint32_t sentinel = static_cast<uint32_t>(pr.num_classes);  // abstain or invalid
    // Zero here; the reduce leaves rows [0, C) zeroed behind it, and row C
    // (never read) is cleared per block only so that it cannot wrap.
    std::vector<Lane> counts((pr.num_classes + 1) * block);
    std::vector<uint32_t> symbols(block);
    const std::vector<Lane> w = lane_weights<Lane>(pr);
    for (int64_t j0 = i0; j0 < i1; j0 += block) {
      const int64_t len = std::min(block, i1 - j0);
      std::fill_n(counts.begin() + pr.num_classes * block, block, Lane(0));
      for (int64_t p = 0; p < pr.peers; ++p) {
        unpack_block<S, uint32_t, kClassMajorMaxBits>(pr, p, j0, len, symbols.data(), first_bad);
        const Lane wp = pr.weights ? w[p] : Lane(1);
        Lane* cnt = counts.data();
        for (int64_t j = 0; j < len; ++j) cnt[std::min(symbols[j], sentinel) * block + j] += wp;
      }
      class_major_reduce<S, Lane>(counts.data(), block, classes, j0, len, *out_);
    }
  }
};

// ---- per-probe table --------------------------------------------------------- //
// keys[s] = count_s << kClassBits | (kClassMask - s), so comparing keys
// compares counts and then prefers the smaller class. Counts only grow, so the
// running maximum over a probe's increments is its winner's final key.
constexpr int kClassBits = kTableMaxBits;
constexpr uint64_t kClassMask = (uint64_t(1) << kClassBits) - 1;
// Summed weight below this keeps count << kClassBits inside 64 bits; below
// kTableMaxWeight32, inside 32 bits (half the table, so more of it in cache).
constexpr uint64_t kTableMaxWeight = uint64_t(1) << (64 - kClassBits);
constexpr uint64_t kTableMaxWeight32 = uint64_t(1) << (32 - kClassBits);
// Probes counted side by side, each in a table of its own: a class voted many
// times makes a chain of increments through memory (load, add, store, load
// the same entry ...), and K independent chains overlap where one would
// stall. Used while the K tables fit in kTableInterleaveBytes (L2).
constexpr int kTableInterleave = 4;
constexpr int64_t kTableInterleaveBytes = 1 << 20;

// Counts K probes from tile columns [j, j + K) (rows of `block` symbols, one
// per peer) into tables keys + k * num_keys, writes probes [i, i + K), and
// leaves every touched entry reset to its count-0 key.
template <int K, bool kWeighted, bool kAbstain, typename Key>
TT_INLINE void table_probes(const Problem& pr, const Outputs& out, const uint32_t* tile,
                            int64_t block, int64_t j, int64_t i, Key* keys, uint32_t num_keys,
                            const Key* increment) {
  constexpr Key kOne = Key(1) << kClassBits;
  const uint32_t abstain = static_cast<uint32_t>(pr.num_classes);
  Key best[K] = {}, ignored[K] = {}, runner[K] = {};
  uint32_t winner[K];
  for (int64_t p = 0; p < pr.peers; ++p) {
    const uint32_t* sym = tile + p * block + j;
    const Key inc = kWeighted ? increment[p] : kOne;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const uint32_t s = sym[k];
      Key* key = keys + k * num_keys;
      Key v = key[s] + inc;
      key[s] = v;
      // An abstention adds to the ignored weight and must not lead.
      if constexpr (kAbstain) {
        const bool skip = s == abstain;
        ignored[k] += skip ? inc : 0;
        v = skip ? 0 : v;
      }
      best[k] = std::max(best[k], v);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k)
    winner[k] = static_cast<uint32_t>(kClassMask - (best[k] & kClassMask));
  // Runner-up: every read before any reset, so that no load waits on a
  // store to the same entry (a class voted twice would otherwise read the
  // reset key back through the store buffer).
  for (int64_t p = 0; p < pr.peers; ++p) {
    const uint32_t* sym = tile + p * block + j;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const uint32_t s = sym[k];
      const bool other = s != winner[k] && (!kAbstain || s != abstain);
      // A mask, not a select: compilers turn `other ? key[s] : 0` into a
      // branch around the load, which mispredicts on every vote when the
      // winner holds a large but partial share (the usual regime).
      runner[k] = std::max(runner[k], Key(keys[k * num_keys + s] & (Key(0) - Key(other))));
    }
  }
  for (int64_t p = 0; p < pr.peers; ++p) {
    const uint32_t* sym = tile + p * block + j;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const uint32_t s = sym[k];
      keys[k * num_keys + s] = static_cast<Key>(kClassMask - s);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const uint64_t total = pr.weight_sum - (static_cast<uint64_t>(ignored[k]) >> kClassBits);
    store(out, i + k, total, winner[k], static_cast<uint64_t>(best[k] >> kClassBits),
          static_cast<uint64_t>(runner[k] >> kClassBits));
  }
}

template <bool kWeighted, bool kAbstain, typename Key>
__attribute__((noinline)) void tally_table(const Problem& pr, const Outputs& out, int64_t block,
                                           int64_t i0, int64_t i1, int64_t* first_bad) {
  // One key per possible symbol, so symbols need no clamping: an invalid one
  // gets a key of its own and the tally fails afterwards anyway.
  const uint32_t num_keys = uint32_t(1) << pr.b;
  // (Fewer probes than tables: one table, no more to fill.)
  const int tables =
      i1 - i0 >= kTableInterleave &&
              kTableInterleave * int64_t(num_keys) * int64_t(sizeof(Key)) <= kTableInterleaveBytes
          ? kTableInterleave
          : 1;
  std::vector<Key> keys(size_t(tables) * num_keys);  // count 0 between probes
  for (int t = 0; t < tables; ++t)
    for (uint32_t s = 0; s < num_keys; ++s) keys[size_t(t) * num_keys + s] = kClassMask - s;
  std::vector<uint32_t> tile(pr.peers * block);  // [P][block]
  std::vector<Key> increment(pr.peers);
  for (int64_t p = 0; p < pr.peers; ++p)
    increment[p] = static_cast<Key>(weight_of(pr, p) << kClassBits);
  for (int64_t j0 = i0; j0 < i1; j0 += block) {
    const int64_t len = std::min(block, i1 - j0);
    for (int64_t p = 0; p < pr.peers; ++p)
      dispatch<UnpackBlock<kTableMaxBits>>(&pr, p, j0, len, tile.data() + p * block, first_bad);
    int64_t j = 0;
    if (tables == kTableInterleave)
      for (; j + kTableInterleave <= len; j += kTableInterleave)
        table_probes<kTableInterleave, kWeighted, kAbstain>(
            pr, out, tile.data(), block, j, j0 + j, keys.data(), num_keys, increment.data());
    for (; j < len; ++j)
      table_probes<1, kWeighted, kAbstain>(pr, out, tile.data(), block, j, j0 + j, keys.data(),
                                           num_keys, increment.data());
  }
}

// ---- sort per probe ---------------------------------------------------------- //
__attribute__((noinline)) void tally_sorted(const Problem& pr, const Outputs& out, int64_t block,
                                            int64_t i0, int64_t i1, int64_t* first_bad) {
  std::vector<uint32_t> tile(pr.peers * block);
  std::vector<std::pair<uint32_t, uint64_t>> votes;
  votes.reserve(pr.peers);
  for (int64_t j0 = i0; j0 < i1; j0 += block) {
    const int64_t len = std::min(block, i1 - j0);
    for (int64_t p = 0; p < pr.peers; ++p)
      dispatch<UnpackBlock<32>>(&pr, p, j0, len, tile.data() + p * block, first_bad);
    for (int64_t j = 0; j < len; ++j) {
      votes.clear();
      uint64_t total = 0;
      for (int64_t p = 0; p < pr.peers; ++p) {
        const uint32_t s = tile[p * block + j];
        if (s >= pr.num_classes) continue;  // abstained (or invalid)
        votes.emplace_back(s, weight_of(pr, p));
        total += weight_of(pr, p);
      }
      std::sort(votes.begin(), votes.end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
      // Runs in ascending class order: strictly greater keeps the first
      // (smallest) class among equal counts.
      uint64_t best = 0, second = 0;
      uint32_t win = 0;
      bool have = false;
      for (size_t r = 0; r < votes.size();) {
        size_t e = r;
        uint64_t c = 0;
        for (; e < votes.size() && votes[e].first == votes[r].first; ++e) c += votes[e].second;
        if (!have || c > best) {
          if (have) second = std::max(second, best);
          best = c;
          win = votes[r].first;
          have = true;
        } else {
          second = std::max(second, c);
        }
        r = e;
      }
      store(out, j0 + j, total, win, best, second);
    }
  }
}

template <typename Key>
void tally_table_keys(const Problem& pr, const Outputs& out, int64_t block, int64_t i0, int64_t i1,
                      int64_t* first_bad, bool abstain) {
  if (pr.weights)
    abstain ? tally_table<true, true, Key>(pr, out, block, i0, i1, first_bad)
            : tally_table<true, false, Key>(pr, out, block, i0, i1, first_bad);
  else
    abstain ? tally_table<false, true, Key>(pr, out, block, i0, i1, first_bad)
            : tally_table<false, false, Key>(pr, out, block, i0, i1, first_bad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tally_cpu(
    const at::Tensor& votes, int64_t n, int64_t num_classes,
    const std::optional<at::Tensor>& weights, bool abstain) {
  const int b = check_tally_votes(votes, n, num_classes, abstain);
  const int64_t num_symbols = abstain ? num_classes + 1 : num_classes;
  const int64_t peers = votes.size(0);

  const TallyWeights w = check_tally_weights(weights, peers);

  const at::Tensor v = votes.contiguous();
  const auto opts = votes.options().dtype(at::kLong);
  at::Tensor label = at::empty({n}, opts), count = at::empty({n}, opts),
             total = at::empty({n}, opts), runner_up = at::empty({n}, opts);
  if (n == 0) return {label, count, total, runner_up};

  Problem pr{v.data_ptr<uint8_t>(),
             peers,
             v.size(1),
             n,
             b,
             static_cast<uint64_t>(num_classes),
             static_cast<uint64_t>(num_symbols),
             w.host.defined() ? w.host.const_data_ptr<int64_t>() : nullptr,
             w.sum};
  const Outputs out{label.data_ptr<int64_t>(), count.data_ptr<int64_t>(), total.data_ptr<int64_t>(),
                    runner_up.data_ptr<int64_t>()};
  // Counts never exceed the summed weight: narrow counts when it fits.
  const uint64_t wsum = pr.weight_sum;
  const bool fits16 = wsum <= static_cast<uint64_t>(std::numeric_limits<int16_t>::max());
  const bool fits32 = wsum <= static_cast<uint64_t>(std::numeric_limits<int32_t>::max());

  const int64_t votes_per_probe = std::max<int64_t>(peers, 1);
  enum class Strategy { kTiny, kClassMajor, kTable, kSorted };
  Strategy strategy = Strategy::kSorted;
  if (num_classes <= kTinyMaxClasses && fits32)
    strategy = Strategy::kTiny;
  else if (num_classes <= kClassMajorMaxClasses && fits32 &&
           (num_classes <= kClassMajorClassesPerVote * votes_per_probe ||
            num_classes <= kClassMajorAlwaysClasses))
    strategy = Strategy::kClassMajor;
  else if (b <= kTableMaxBits && wsum < kTableMaxWeight)
    strategy = Strategy::kTable;
  const int64_t lane_bytes = fits16 ? 2 : 4;
  // Probes per block: a multiple of 64 so that blocks start on a byte
  // boundary of every stream and vector loops have no ragged middle, sized to
  // keep the block's working set in cache.
  auto round64 = [](int64_t v) { return std::max<int64_t>(64, v / 64 * 64); };
  int64_t block = 0;
  switch (strategy) {
    case Strategy::kTiny:
      block = std::min<int64_t>(2048, round64(kTileBytes / (lane_bytes * votes_per_probe)));
      break;
    case Strategy::kClassMajor:
      block = std::min<int64_t>(1024, round64(kClassMajorBytes / (lane_bytes * (num_classes + 1))));
      break;
    default:
      block = std::min<int64_t>(512, round64(kTileBytes / (4 * votes_per_probe)));
  }
  const int64_t num_blocks = (n + block - 1) / block;
  // At least ~64K votes per task so that small tallies stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (block * votes_per_probe));

  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, num_blocks, grain, [&](int64_t blk0, int64_t blk1) {
    const int64_t i0 = blk0 * block, i1 = std::min(n, blk1 * block);
    int64_t bad = std::numeric_limits<int64_t>::max();
    switch (strategy) {
      case Strategy::kTiny:
        fits16 ? dispatch<TinyTally<int16_t>>(&pr, &out, block, i0, i1, &bad)
               : dispatch<TinyTally<int32_t>>(&pr, &out, block, i0, i1, &bad);
        break;
      case Strategy::kClassMajor:
        fits16 ? dispatch<ClassMajorTally<int16_t>>(&pr, &out, block, i0, i1, &bad)
               : dispatch<ClassMajorTally<int32_t>>(&pr, &out, block, i0, i1, &bad);
        break;
      case Strategy::kTable:
        if (wsum < kTableMaxWeight32)
          tally_table_keys<uint32_t>(pr, out, block, i0, i1, &bad, abstain);
        else
          tally_table_keys<uint64_t>(pr, out, block, i0, i1, &bad, abstain);
        break;
      case Strategy::kSorted:
        tally_sorted(pr, out, block, i0, i1, &bad);
    }
    record_first(first_bad, bad);
  });

  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t p = bad / n, i = bad % n;
    fail_symbol_out_of_range(
        "votes", static_cast<int64_t>(read_symbol(pr.votes + p * pr.nbytes, pr.nbytes, i, b)), bad,
        num_symbols);
  }
  return {label, count, total, runner_up};
}

}  // namespace

TALLYTRAIN_IMPL(CPU, m) { m.impl("tally", &tally_cpu); }

}  // namespace cpu
}  // namespace tallytrain
