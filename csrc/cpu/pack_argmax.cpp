// pack_argmax on the CPU: each row's torch.argmax, packed into a b-bit stream
// (docs/design.md §2-§3), optionally with the row's top-1 softmax probability and
// abstention, in one pass over the logits that never materialises the indices.
//
// Argmax compares orderable integer keys (simd.h, the same maps as common.h),
// so a plain unsigned max reproduces torch.argmax: first index of the maximum,
// NaN the largest (the first NaN wins), -0.0 == +0.0. Two row shapes:
//  - long rows: per row, a vectorised max over 1 KiB chunks remembers the
//    first chunk that reached the maximum; a scalar scan of that chunk (still
//    in L1) finds the first index (float32 rows: blocks of 4 vectors, below).
//    The probability pass re-reads the row from L2.
//  - short rows (C below kShortRowLimit): rows are too short to fill vectors,
//    so a block of rows is transposed in L1 and lane r of each vector carries
//    row r through the argmax and the probability.
// The probability is 1 / sum_j exp(x_j - max) with a polynomial exp (simd.h).
// When only the abstention decision is wanted (no return_prob), a long row
// usually skips that pass: the argmax pass also keeps the second-largest
// logit, which bounds the probability from both sides (DecisionGaps),
// and a row the bounds leave open stops summing once the partial sum alone
// decides it. The decision is the one the full sum would make.
// Rows go to threads in runs of whole groups of 8, so each writes whole bytes.
// Every loop over the logits is a template over the CPU level's vectors
// (simd.h) and runs at the level chosen at run time.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu_common.h"
#include "simd.h"

namespace tallytrain {
namespace cpu {
namespace {

using namespace simd;

// Rows with fewer classes take the short-row path, where the per-row costs
// of the long-row path (reductions, partial vectors) would dominate; the
// probability pass moves the measured crossover up.
constexpr int64_t kShortRowLimit = 64;
constexpr int64_t kShortRowLimitWithProb = 128;

constexpr bool uses_short_rows(int64_t cols, bool need_prob) {
  return cols < (need_prob ? kShortRowLimitWithProb : kShortRowLimit);
}

// Elements of logits per short-row block: its transpose stays in L1.
constexpr int64_t kShortBlockElems = 4096;

// Per-dtype lane operations on the vectors of the CPU level S. Raw is the bit
// pattern of one element; Key its orderable key (same width); a KeyVec holds
// kLanes elements (one register); a Float holds kLanes of 4 bytes.
template <class S>
struct Float32 {
  using Isa = S;
  static constexpr bool kIsFloat32 = true;
  using Raw = uint32_t;
  using Key = uint32_t;
  using KeyVec = typename S::u32;
  using LaneIndex = typename S::i32;
  using Float = typename S::f32;
  static constexpr int kLanes = S::kBytes / 4;
  static constexpr Key kNaNKey = 0xffffffffu;
  static constexpr Key kZeroKey = 0x80000000u;
  static TT_INLINE KeyVec keys(const KeyVec& raw) { return keys_f32(raw); }
  static TT_INLINE Key key(Raw raw) { return key_f32(raw); }
  // The kLanes elements of `raw` as float vectors (1 for float32).
  static constexpr int kFloatVecs = 1;
  static TT_INLINE void to_float(const KeyVec& raw, Float* out) { out[0] = (Float)raw; }
  static TT_INLINE float value(Raw raw) {
    float f;
    memcpy(&f, &raw, 4);
    return f;
  }
};

template <class S, uint16_t kExpMask_>
struct Float16Bits {
  using Isa = S;
  static constexpr bool kIsFloat32 = false;
  using Raw = uint16_t;
  using Key = uint16_t;
  using KeyVec = typename S::u16;
  using LaneIndex = typename S::i16;
  using Float = typename S::f32;
  static constexpr int kLanes = S::kBytes / 2;
  static constexpr Key kNaNKey = 0xffffu;
  static constexpr Key kZeroKey = 0x8000u;
  static constexpr uint16_t kExpMask = kExpMask_;
  static TT_INLINE KeyVec keys(const KeyVec& raw) { return keys_f16bits<kExpMask>(raw); }
  static TT_INLINE Key key(Raw raw) { return key_f16bits(raw, kExpMask); }
  static constexpr int kFloatVecs = 2;
  static TT_INLINE Float widen_to_float(const typename S::u32& h) {
    if constexpr (kExpMask == kBFloat16ExpMask)
      return bf16_to_f32(h);
    else
      return f16_to_f32(h);
  }
  static TT_INLINE void to_float(const KeyVec& raw, Float* out) {
    out[0] = widen_to_float(widen<0>(raw));
    out[1] = widen_to_float(widen<1>(raw));
  }
  // One lane of the vector conversion, so that scalar and lanes agree.
  static TT_INLINE float value(Raw raw) {
    return widen_to_float(typename S::u32{} + uint32_t(raw))[0];
  }
};
template <class S>
using BFloat16 = Float16Bits<S, kBFloat16ExpMask>;
template <class S>
using Float16 = Float16Bits<S, kHalfExpMask>;

// The element whose key is `key` (a NaN for the NaN key, +0.0 for the zero key).
template <class F>
TT_INLINE typename F::Raw raw_of_key(typename F::Key key) {
  using Key = typename F::Key;
  constexpr Key kSign = Key(Key(1) << (8 * sizeof(Key) - 1));
  return (key & kSign) ? Key(key ^ kSign) : Key(~key);
}

// First j in [begin, end) whose key is `key`; `end` if none.
template <class F>
TT_INLINE int64_t find_key(const typename F::Raw* row, int64_t begin, int64_t end,
                           typename F::Key key) {
  int64_t j = begin;
  if (key != F::kNaNKey && key != F::kZeroKey) {
    // Exactly one bit pattern has this key: compare bits.
    const typename F::Raw raw = raw_of_key<F>(key);
    while (j < end && row[j] != raw) ++j;
  } else {
    // Every NaN, or both zeros, share the key.
    while (j < end && F::key(row[j]) != key) ++j;
  }
  return j;
}

template <class F>
struct RowArgmax {
  int64_t index;
  typename F::Key key;
  typename F::Key second;    // the second-largest key (ties count twice); with kSecond only
  bool second_exact = true;  // else `second` is a lower bound (see long_row_argmax_f32)
};

// The keys of the first `count` elements at p (count < kLanes); other lanes 0,
// below every real key.
template <class F>
TT_INLINE typename F::KeyVec partial_keys(const typename F::Raw* p, int count) {
  using KeyVec = typename F::KeyVec;
  const KeyVec k = F::keys(load_partial<KeyVec>(p, count));
  using LaneIndex = typename F::LaneIndex;
  return iota<LaneIndex>() < static_cast<Lane<LaneIndex>>(count) ? k : KeyVec{};
}

// Lane-wise top two of everything merged in so far (a lane's two largest
// values, ties counted twice). V: key vectors, or float vectors without NaN.
template <typename V, typename T>
struct LaneTop2 {
  V first, second;
  TT_INLINE explicit LaneTop2(T lowest) : first(V{} + lowest), second(V{} + lowest) {}
  TT_INLINE LaneTop2(const V& first_, const V& second_) : first(first_), second(second_) {}
  TT_INLINE void add(const V& k) {
    second = vmax(second, vmin(first, k));
    first = vmax(first, k);
  }
  TT_INLINE void merge(const LaneTop2& o) {
    second = vmax(vmax(second, o.second), vmin(first, o.first));
    first = vmax(first, o.first);
  }
  // The second-largest value over all lanes, counting repeats: when two
  // lanes hold the top value it is the second value too. Lane operations
  // only (a scalar walk over the lanes mispredicted on most rows).
  TT_INLINE T second_value(T lowest) const {
    constexpr int kCount = kLanes<V>;
    using U = Like<std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>, V>;
    const T top = hmax(first);
    const auto at_top = first == top;
    const U lane = iota<U>(), none = {};
    // The last lane holding top, and the first one counted from the end.
    const auto last = hmax(at_top ? lane : none);
    const auto from_end = hmax(at_top ? (U{} + (kCount - 1)) - lane : none);
    if (int(last) + int(from_end) != kCount - 1) return top;
    return std::max(hmax(second), hmax(at_top ? V{} + lowest : first));
  }
};

// kSecond: also find the second-largest key (for the abstention bounds).
template <class F, bool kSecond>
TT_INLINE RowArgmax<F> long_row_argmax(const typename F::Raw* row, int64_t cols) {
  using Key = typename F::Key;
  using KeyVec = typename F::KeyVec;
  constexpr int L = F::kLanes;
  constexpr int64_t kChunk = 1024 / sizeof(typename F::Raw);  // 1 KiB, a multiple of 2L
  const int64_t whole = cols - cols % L;
  // Every real key is > 0, so the first chunk always takes over.
  Key best = 0;
  int64_t best_chunk = 0;
  LaneTop2<KeyVec, Key> top2(0);
  for (int64_t start = 0; start < whole; start += kChunk) {
    const int64_t end = std::min(start + kChunk, whole);
    KeyVec m;
    if constexpr (kSecond) {
      // One chain per lane pair of top-two accumulators (their updates are
      // twice the work of a plain max, so one chain already fills the ports).
      // (Key 0 is below every key, as a lane's second while it has one.)
      LaneTop2<KeyVec, Key> chunk(F::keys(load<KeyVec>(row + start)), KeyVec{});
      for (int64_t j = start + L; j < end; j += L) chunk.add(F::keys(load<KeyVec>(row + j)));
      m = chunk.first;
      top2.merge(chunk);
    } else {
      KeyVec acc0 = F::keys(load<KeyVec>(row + start));
      KeyVec acc1 = acc0;  // two chains of max, for throughput
      int64_t j = start + L;
      for (; j + 2 * L <= end; j += 2 * L) {
        acc0 = vmax(acc0, F::keys(load<KeyVec>(row + j)));
        acc1 = vmax(acc1, F::keys(load<KeyVec>(row + j + L)));
      }
      if (j < end) acc0 = vmax(acc0, F::keys(load<KeyVec>(row + j)));
      m = vmax(acc0, acc1);
    }
    const Key chunk_max = hmax(m);
    if (chunk_max > best) {
      best = chunk_max;
      best_chunk = start;
      // Nothing beats the first NaN (and a NaN row needs no second).
      if (chunk_max == F::kNaNKey) return {find_key<F>(row, start, end, best), best, best};
    }
  }
  if (whole < cols) {
    const KeyVec k = partial_keys<F>(row + whole, static_cast<int>(cols - whole));
    if constexpr (kSecond) top2.add(k);
    const Key m = hmax(k);
    if (m > best) {
      best = m;
      best_chunk = whole;
    }
  }
  const Key second = kSecond ? top2.second_value(0) : Key(0);
  return {find_key<F>(row, best_chunk, cols, best), best, second};
}

// 16-bit float rows when only the argmax is wanted, without a key per
// element. As int16 the bits order the non-negative floats (+0.0 = 0 below
// them, every negative float below that) and, in reverse, the negative
// floats (-0.0 = INT16_MIN the smallest). So the row's maximum is its
// largest int16 if that is >= 0, else (every element negative) its smallest:
// a signed max and min per vector (SSE2 has both), where the keys took 8 to
// 10 operations (on AVX2 more, without unsigned compares). A NaN, which must
// win, shows in the largest magnitude; such rows take the key path. Chunks
// of 1 KiB, as there, locate the first occurrence.
template <class F>
TT_INLINE RowArgmax<F> long_row_argmax_16bit(const uint16_t* row, int64_t cols) {
  using U = typename F::KeyVec;
  using I = Like<int16_t, U>;
  constexpr int L = F::kLanes;
  constexpr int64_t kChunk = 512;
  static_assert(kShortRowLimit >= 64 && L <= 64, "long rows must hold a whole vector");
  constexpr uint16_t kSignFlip = 0x8000;  // int16 order <-> uint16 order
  const int64_t whole = cols - cols % L;
  int16_t best_top = INT16_MIN, best_bottom = INT16_MAX;
  int64_t chunk_top = 0, chunk_bottom = 0;
  I magnitude = {};
  const auto chunk_done = [&](const I& top, const I& bottom, int64_t at) {
    // (Unsigned lanes: zero-filled reductions. 0x7fff - b reverses int16 order.)
    const auto t = static_cast<int16_t>(hmax((U)top ^ kSignFlip) ^ kSignFlip);
    const auto b = static_cast<int16_t>(INT16_MAX - int(hmax(uint16_t(INT16_MAX) - (U)bottom)));
    if (t > best_top) best_top = t, chunk_top = at;
    if (b < best_bottom) best_bottom = b, chunk_bottom = at;
  };
  for (int64_t start = 0; start < whole; start += kChunk) {
    const int64_t end = std::min(start + kChunk, whole);
    I top = I{} + INT16_MIN, bottom = I{} + INT16_MAX;
    for (int64_t j = start; j < end; j += L) {
      const I v = load<I>(row + j);
      top = vmax(top, v);
      bottom = vmin(bottom, v);
      magnitude = vmax(magnitude, v & int16_t(0x7fff));
    }
    chunk_done(top, bottom, start);
  }
  if (whole < cols) {
    // The row's last L elements: those seen before cannot beat themselves.
    const I v = load<I>(row + cols - L);
    magnitude = vmax(magnitude, v & int16_t(0x7fff));
    chunk_done(v, v, whole);
  }
  if (hmax((U)magnitude) > F::kExpMask) return long_row_argmax<F, false>(row, cols);
  const bool nonnegative = best_top >= 0;
  const auto raw = static_cast<uint16_t>(nonnegative ? best_top : best_bottom);
  // A maximum of +0.0 ties with every -0.0, which the signed max skipped.
  const int64_t from = raw == 0 ? 0 : nonnegative ? chunk_top : chunk_bottom;
  const typename F::Key key = F::key(raw);
  return {find_key<F>(row, from, cols, key), key, key};
}

// Whether a float32 row holds a NaN (|x|'s bits above +inf's).
template <class S>
TT_INLINE bool row_has_nan(const uint32_t* bits, int64_t cols) {
  using U = typename S::u32;
  constexpr int L = kLanes<U>;
  U magnitude = {};
  int64_t j = 0;
  for (; j + L <= cols; j += L) magnitude = vmax(magnitude, load<U>(bits + j) & 0x7fffffffu);
  if (j < cols) magnitude = vmax(magnitude, load_partial<U>(bits + j, int(cols - j)) & 0x7fffffffu);
  return hmax(magnitude) > 0x7f800000u;
}

// The largest element of a float32 row without NaN other than the one at
// `skip` (the exact second-largest value when `skip` is the argmax). Long
// rows only: the tail is the row's last L elements (a max may see an element
// twice).
template <class S>
TT_INLINE float max_excluding(const float* row, int64_t cols, int64_t skip) {
  using F = typename S::f32;
  using I = typename S::i32;
  constexpr int L = kLanes<F>;
  constexpr float kLowest = -std::numeric_limits<float>::infinity();
  const I lane = iota<I>();
  // (Such rows have fewer than 2^30 elements: the differences fit.)
  const auto without_skip = [&](int64_t at) {
    return lane != int32_t(skip - at) ? load<F>(row + at) : kLowest;
  };
  F acc = F{} + kLowest;
  int64_t j = 0;
  for (; j + L <= cols; j += L) acc = vmax(acc, without_skip(j));
  if (j < cols) acc = vmax(acc, without_skip(cols - L));
  return hmax(acc);
}

// float32 rows compare the floats themselves. The row is read in blocks of
// four vectors (64 floats at v4, 32 at v3, 16 with 16-byte vectors): a
// block's lane-wise maximum (three vmax) is compared with each lane's best so
// far, which remembers the block where it was first reached (strict >). Two
// chains of blocks, interleaved. The smallest such block among the lanes
// holding the row's maximum contains its first occurrence: any element equal
// to the maximum lifts its lane to the maximum in its own block or earlier.
// One scan of that block finds it. About 2.5 vector operations per vector
// read (a lane-wise max and index per vector took 6 to 9), so a row in cache
// is read at load speed.
//
// Plain float order agrees with torch.argmax except for NaN (-0.0 == +0.0
// either way). Non-finite elements are noticed on the side: v * 0 is 0 for
// finite v and NaN for NaN and for +-inf, so a NaN sum flags the row. Then
// an exact test; rows with a NaN take the key path (infinities compare
// correctly as floats).
//
// kSecond: `second` is the second largest of the 2 x L (chain, lane) maxima,
// a lower bound on the row's second-largest value, exact unless the two
// largest elements share a chain and lane (then second_exact is false).
template <class S, bool kSecond>
TT_INLINE RowArgmax<Float32<S>> long_row_argmax_f32(const uint32_t* bits, int64_t cols) {
  using F = typename S::f32;
  using I = typename S::i32;
  constexpr int L = kLanes<F>;
  static_assert(kShortRowLimit >= 4 * 16, "long rows must hold a block of the widest vectors");
  constexpr int64_t kBlock = 4 * L;
  // Rows just written by inference are mostly out of L2 by the time they
  // are packed; fetching 4 KiB ahead measured 4-20% faster there and no
  // slower on cached rows.
  constexpr int64_t kPrefetchAhead = 1024;  // floats
  constexpr int kFloatsPerLine = 16;
  constexpr float kLowest = -std::numeric_limits<float>::infinity();
  const float* row = reinterpret_cast<const float*>(bits);
  F best[2] = {F{} + kLowest, F{} + kLowest};  // an all -inf row: index 0
  I where[2] = {I{}, I{}};
  F poison[4] = {};
  const auto block = [&](int c, int64_t at, const F(&v)[4]) {
    const F m = vmax(vmax(v[0], v[1]), vmax(v[2], v[3]));
    const auto greater = m > best[c];
    best[c] = greater ? m : best[c];
    where[c] = greater ? I{} + int32_t(at) : where[c];
  };
  int64_t j = 0;
  for (; j + 2 * kBlock <= cols; j += 2 * kBlock) {
    for (int q = 0; q < 2 * kBlock; q += kFloatsPerLine)
      __builtin_prefetch(row + j + kPrefetchAhead + q);
    for (int c = 0; c < 2; ++c) {
      const float* p = row + j + c * kBlock;
      const F v[4] = {load<F>(p), load<F>(p + L), load<F>(p + 2 * L), load<F>(p + 3 * L)};
      for (int q = 0; q < 4; ++q) poison[q] += v[q] * 0.0f;
      block(c, j + c * kBlock, v);
    }
  }
  // At most two blocks left, the last one partial. A vector that would run
  // past the row is the row's last L elements instead (long rows have at
  // least 4L), with those already seen masked: no partial loads, whose
  // stores to the stack stalled the next load.
  for (; j < cols; j += kBlock) {
    F v[4];
    for (int q = 0; q < 4; ++q) {
      const int64_t at = j + q * L;
      if (at + L <= cols) {
        v[q] = load<F>(row + at);
        poison[q] += v[q] * 0.0f;
      } else if (at < cols) {
        const F x = load<F>(row + cols - L);
        poison[q] += x * 0.0f;
        v[q] = iota<I>() >= int32_t(at - (cols - L)) ? x : kLowest;
      } else {
        v[q] = F{} + kLowest;
      }
    }
    block(0, j, v);
  }
  if (std::isnan(hsum((poison[0] + poison[1]) + (poison[2] + poison[3]))) &&
      row_has_nan<S>(bits, cols))
    return long_row_argmax<Float32<S>, kSecond>(bits, cols);
  const float max_value = hmax(vmax(best[0], best[1]));
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  const auto smallest = [](const I& v) {  // of lanes in 0..kMax
    return kMax - static_cast<int32_t>(hmax((typename S::u32)(kMax - v)));
  };
  I first = I{} + kMax;
  for (int c = 0; c < 2; ++c) first = vmin(first, best[c] == max_value ? where[c] : first);
  // The first element equal to the maximum, in that block (see above).
  const int64_t start = smallest(first);
  const int64_t end = std::min(start + kBlock, cols);
  I found = I{} + kMax;
  for (int64_t at = start; at < end; at += L) {
    const int64_t from = std::min(at, cols - L);
    found = vmin(found, load<F>(row + from) == max_value ? iota<I>() + int32_t(from) : found);
  }
  const int64_t index = smallest(found);
  float second_value = kLowest;
  bool second_exact = true;
  if constexpr (kSecond) {
    LaneTop2<F, float> lanes(best[0], F{} + kLowest);
    lanes.merge(LaneTop2<F, float>(best[1], F{} + kLowest));
    second_value = lanes.second_value(kLowest);
    second_exact = false;
  }
  uint32_t max_bits, second_bits;
  memcpy(&max_bits, &max_value, 4);
  memcpy(&second_bits, &second_value, 4);
  return {index, key_f32(max_bits), key_f32(second_bits), second_exact};
}

template <class F, bool kSecond>
TT_INLINE RowArgmax<F> row_argmax(const typename F::Raw* row, int64_t cols) {
  // (The float32 path holds indices in 32-bit lanes.)
  if constexpr (F::kIsFloat32) {
    if (cols < (int64_t(1) << 30)) return long_row_argmax_f32<typename F::Isa, kSecond>(row, cols);
  } else if constexpr (!kSecond) {
    return long_row_argmax_16bit<F>(row, cols);
  }
  return long_row_argmax<F, kSecond>(row, cols);
}

// 1 / sum_j exp(x_j - max) for a row with a finite maximum `max_value`.
// The sum only grows, so once it passes `stop_above` the probability is
// known to be below 1 / stop_above and the rest is skipped (the value then
// returned is that upper bound, not the probability).
template <class F>
TT_INLINE float long_row_prob(const typename F::Raw* row, int64_t cols, float max_value,
                              double stop_above) {
  using KeyVec = typename F::KeyVec;
  using Float = typename F::Float;
  constexpr int L = F::kLanes;
  constexpr int kFloatLanes = kLanes<Float>;
  constexpr int64_t kChunk = 16 * L;
  const int64_t whole = cols - cols % L;
  const Float shift = Float{} + max_value;
  // Float lanes within a chunk (at most 32 terms per lane), the chunks in
  // double, so the sum stays accurate at any C.
  double total = 0.0;
  for (int64_t start = 0; start < whole; start += kChunk) {
    const int64_t end = std::min(start + kChunk, whole);
    Float acc = {};
    for (int64_t j = start; j < end; j += L) {
      Float x[F::kFloatVecs];
      F::to_float(load<KeyVec>(row + j), x);
      for (int v = 0; v < F::kFloatVecs; ++v) acc += exp_nonpositive(x[v] - shift);
    }
    total += hsum(acc);
    if (total > stop_above) return 1.0f / static_cast<float>(total);
  }
  if (whole < cols) {
    const int count = static_cast<int>(cols - whole);
    Float x[F::kFloatVecs];
    F::to_float(load_partial<KeyVec>(row + whole, count), x);
    Float acc = {};
    for (int v = 0; v < F::kFloatVecs; ++v) {
      const Float e = exp_nonpositive(x[v] - shift);
      acc += (iota<Like<int32_t, Float>>() + kFloatLanes * v) < count ? e : Float{};
    }
    total += hsum(acc);
  }
  return 1.0f / static_cast<float>(total);
}

// Relative margin by which a bound must clear the threshold to decide a row
// without the full sum. The full sum (polynomial exp, float lanes, double
// chunks) is within a few 1e-6 of the exact one, so outside this margin the
// full computation could not decide otherwise.
constexpr double kDecisionMargin = 1e-4;

enum class Decision { kOpen, kVote, kAbstain };

// The top-1 probability p = 1 / sum_j e^(x_j - max) of a row with a finite
// maximum and a gap d = max - second to its second-largest logit lies in
// [1 / (1 + (C-1) e^-d), 1 / (1 + e^-d)]. Both ends are monotone in d, so a
// row is decided by comparing d with two gaps worked out once per call.
constexpr double kInfinity = std::numeric_limits<double>::infinity();

struct DecisionGaps {
  double abstain_below_gap;  // d below this: p < threshold surely
  double vote_from_gap;      // d at or above this: p >= threshold surely

  DecisionGaps(float threshold, int64_t cols) {
    constexpr double kInf = std::numeric_limits<double>::infinity();
    const double t = threshold;
    // 1 / (1 + e^-d) < t (1 - margin)  <=>  e^-d > 1 / (t (1 - margin)) - 1.
    const double lo = 1.0 / (t * (1.0 - kDecisionMargin)) - 1.0;  // > 0 for t <= 1
    abstain_below_gap = t > 0.0 ? -std::log(lo) : -kInf;
    // 1 / (1 + (C-1) e^-d) >= t (1 + margin)  <=>  (C-1) e^-d <= 1 / (t (1 + margin)) - 1.
    const double hi = 1.0 / (t * (1.0 + kDecisionMargin)) - 1.0;  // +inf for t = 0
    vote_from_gap = hi > 0.0 ? std::log(static_cast<double>(cols - 1) / hi) : kInf;
  }

  TT_INLINE Decision decide(float max_value, float second_value) const {
    const double gap = static_cast<double>(max_value) - static_cast<double>(second_value);
    if (gap < abstain_below_gap) return Decision::kAbstain;
    if (gap >= vote_from_gap) return Decision::kVote;
    return Decision::kOpen;
  }
};

// Everything one task needs; the task packs rows [r0, r1), r0 a multiple of 8.
struct Job {
  const void* data;
  int64_t row_stride;  // elements
  int64_t cols;
  int bits;
  bool need_prob;  // return_prob or abstention
  bool abstain;
  float threshold;  // abstain_below as float32, as torch compares it
  float* prob;      // [N] or nullptr when not returned
  uint8_t* packed;
};

// torch.softmax gives NaN when the maximum is NaN or +inf, or the row is all
// -inf: exactly the rows whose maximum is not finite.
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

TT_INLINE uint64_t emit(const Job& job, int64_t row, int64_t index, float prob) {
  if (job.prob) job.prob[row] = prob;
  // NaN probabilities abstain too: the test is prob >= threshold.
  return (job.abstain && !(prob >= job.threshold)) ? static_cast<uint64_t>(job.cols)
                                                   : static_cast<uint64_t>(index);
}

// kDecisionOnly: abstention without return_prob, where only p >= threshold
// matters (see DecisionGaps).
template <class F, bool kDecisionOnly>
TT_INLINE void pack_long_rows_as(const Job& job, int64_t r0, int64_t r1) {
  using Raw = typename F::Raw;
  const Raw* data = static_cast<const Raw*>(job.data);
  constexpr double kNoStop = std::numeric_limits<double>::infinity();
  // A partial sum above this makes p < threshold by more than the margin.
  const double stop_above = kDecisionOnly && job.threshold > 0.0f
                                ? (1.0 + kDecisionMargin) / static_cast<double>(job.threshold)
                                : kNoStop;
  const DecisionGaps gaps(job.threshold, job.cols);
  BitWriter out(job.packed + r0 * job.bits / 8);
  for (int64_t r = r0; r < r1; ++r) {
    const Raw* row = data + r * job.row_stride;
    const RowArgmax<F> a = row_argmax<F, kDecisionOnly>(row, job.cols);
    float prob = kNaN;
    if (job.need_prob) {
      const float max_value = F::value(raw_of_key<F>(a.key));
      if (std::isfinite(max_value)) {
        Decision d = Decision::kOpen;
        if constexpr (kDecisionOnly) {
          d = gaps.decide(max_value, F::value(raw_of_key<F>(a.second)));
          // A lower bound on the second value overstates the gap: sound for
          // abstaining, not for voting, which needs the exact second (unless
          // every gap votes: threshold 0).
          if (d == Decision::kVote && !a.second_exact && gaps.vote_from_gap > -kInfinity) {
            if constexpr (F::kIsFloat32)
              d = gaps.decide(max_value,
                              max_excluding<typename F::Isa>(reinterpret_cast<const float*>(row),
                                                             job.cols, a.index));
          }
        }
        // Stand-ins on the decided side of the threshold (never returned:
        // this mode has no probability output).
        if (d == Decision::kVote)
          prob = 1.0f;
        else if (d == Decision::kAbstain)
          prob = 0.0f;
        else
          prob = long_row_prob<F>(row, job.cols, max_value, stop_above);
      }
    }
    out.put(emit(job, r, a.index, prob), job.bits);
  }
  out.flush();
}

template <class F>
TT_INLINE void pack_long_rows(const Job& job, int64_t r0, int64_t r1) {
  if (job.abstain && job.prob == nullptr)
    pack_long_rows_as<F, true>(job, r0, r1);
  else
    pack_long_rows_as<F, false>(job, r0, r1);
}

// The element bits of each lane's key (see raw_of_key).
template <class F>
TT_INLINE typename F::KeyVec raw_of_keys(const typename F::KeyVec& keys) {
  using Key = typename F::Key;
  constexpr Key kSign = Key(Key(1) << (8 * sizeof(Key) - 1));
  return (keys & kSign) != 0 ? keys ^ kSign : ~keys;
}

// The argmax of L float32 rows held as columns (lane r: row r), comparing
// the floats themselves (-0.0 == +0.0, and strict >: the first maximum stays)
// where the keys cost three times the operations on AVX2. Infinities and NaN
// are noticed through a running sum of x * 0, as for long rows: false (and
// nothing written) when some lane holds one, for the key path to decide.
template <class F>
TT_INLINE bool float_column_argmax(const typename F::Raw* col, int64_t stride, int64_t cols,
                                   typename F::KeyVec* arg, typename F::Float* max_value) {
  using Float = typename F::Float;
  using I = Like<int32_t, Float>;
  Float best = load<Float>(col);
  Float poison = best * 0.0f;
  I where = {};
  for (int64_t j = 1; j < cols; ++j) {
    const Float v = load<Float>(col + j * stride);
    poison += v * 0.0f;
    const auto greater = v > best;
    best = greater ? v : best;
    where = greater ? I{} + int32_t(j) : where;
  }
  if (any_nonzero(poison != poison)) return false;
  *arg = (typename F::KeyVec)where;
  max_value[0] = best;
  return true;
}

// Short rows, L rows per vector: a block of rows is transposed into columns
// (column j of the block's rows is contiguous), then lane r of each vector
// carries row r through the argmax and the exp-sum with no per-row reductions.
template <class F>
TT_INLINE void pack_short_rows(const Job& job, int64_t r0, int64_t r1) {
  using Raw = typename F::Raw;
  using Key = typename F::Key;
  using KeyVec = typename F::KeyVec;
  using Float = typename F::Float;
  constexpr int L = F::kLanes;
  constexpr int FV = F::kFloatVecs;
  // A block holds block_rows * cols <= kCapacity elements, and at most
  // kMaxRows rows (C >= 2).
  constexpr int64_t kCapacity =
      std::max<int64_t>(kShortBlockElems, L * (kShortRowLimitWithProb - 1));
  constexpr int64_t kMaxRows = kShortBlockElems / 2;
  const int64_t cols = job.cols;
  const int64_t block_rows = std::max<int64_t>(L, kShortBlockElems / cols / L * L);
  const Raw* data = static_cast<const Raw*>(job.data);
  // Zeroed once: lanes past the last row of a partial block compute on
  // defined values (their results are never used).
  alignas(64) Raw columns[kCapacity] = {};
  alignas(64) Key index[kMaxRows];
  alignas(64) float prob[kMaxRows];
  BitWriter out(job.packed + r0 * job.bits / 8);
  for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
    const int64_t rows = std::min(block_rows, r1 - b0);
    const Raw* x = data + b0 * cols;
    // Transpose, fetching the next block meanwhile (the copy is too short
    // a stream for the hardware prefetcher to run ahead of it).
    const int64_t ahead = std::min(rows, r1 - b0 - rows);
    for (int64_t r = 0; r < rows; ++r) {
      if (r < ahead) __builtin_prefetch(x + (r + rows) * cols);
      for (int64_t j = 0; j < cols; ++j) columns[j * block_rows + r] = x[r * cols + j];
    }
    for (int64_t g = 0; g < rows; g += L) {
      const Raw* col = columns + g;
      KeyVec arg = {};
      Float max_value[FV];
      bool decided = false;
      if constexpr (F::kIsFloat32)
        decided = float_column_argmax<F>(col, block_rows, cols, &arg, max_value);
      if (!decided) {
        KeyVec best = F::keys(load<KeyVec>(col));
        for (int64_t j = 1; j < cols; ++j) {
          const KeyVec k = F::keys(load<KeyVec>(col + j * block_rows));
          const auto greater = k > best;  // strict: the first maximum stays
          best = greater ? k : best;
          arg = greater ? static_cast<Key>(j) : arg;
        }
        F::to_float(raw_of_keys<F>(best), max_value);
      }
      memcpy(index + g, &arg, sizeof(arg));
      if (!job.need_prob) continue;
      Float shift[FV], sum[FV];
      for (int q = 0; q < FV; ++q) {
        shift[q] = finite(max_value[q]) ? max_value[q] : 0.0f;
        sum[q] = Float{};
      }
      for (int64_t j = 0; j < cols; ++j) {
        Float v[FV];
        F::to_float(load<KeyVec>(col + j * block_rows), v);
        for (int q = 0; q < FV; ++q) sum[q] += exp_nonpositive(v[q] - shift[q]);
      }
      for (int q = 0; q < FV; ++q) {
        const Float p = finite(max_value[q]) ? 1.0f / sum[q] : kNaN;
        memcpy(prob + g + kLanes<Float> * q, &p, sizeof(p));
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      out.put(emit(job, b0 + r, index[r], job.need_prob ? prob[r] : kNaN), job.bits);
  }
  out.flush();
}

template <class F>
TT_INLINE void pack_rows(const Job& job, int64_t r0, int64_t r1) {
  if (uses_short_rows(job.cols, job.need_prob))
    pack_short_rows<F>(job, r0, r1);
  else
    pack_long_rows<F>(job, r0, r1);
}

// Rows [r0, r1) of one dtype (Float32, BFloat16 or Float16), compiled for
// every CPU level and run at the active one (simd.h).
template <template <class> class Dtype>
struct PackRows {
  template <class S>
  static TT_INLINE void run(const Job& job, int64_t r0, int64_t r1) {
    pack_rows<Dtype<S>>(job, r0, r1);
  }
};

std::tuple<at::Tensor, at::Tensor> pack_argmax_cpu(const at::Tensor& logits, bool return_prob,
                                                   std::optional<double> abstain_below) {
  const int bits = check_pack_argmax_args(logits, abstain_below);
  const at::ScalarType dtype = logits.scalar_type();
  const int64_t n = logits.size(0);
  const int64_t cols = logits.size(1);
  const bool abstain = abstain_below.has_value();
  const bool need_prob = return_prob || abstain;

  // Long rows are read through their row stride; short-row blocks need rows
  // back to back. Either way elements within a row must be contiguous.
  const bool rows_apart = n > 1 && logits.stride(0) != cols;
  const at::Tensor x = logits.stride(1) != 1 || (uses_short_rows(cols, need_prob) && rows_apart)
                           ? logits.contiguous()
                           : logits;

  at::Tensor packed = at::empty({packed_bytes(n, bits)}, logits.options().dtype(at::kByte));
  at::Tensor prob = at::empty({return_prob ? n : 0}, logits.options().dtype(at::kFloat));
  if (n == 0) return {packed, prob};

  Job job;
  job.data = x.data_ptr();
  job.row_stride = n > 1 ? x.stride(0) : cols;
  job.cols = cols;
  job.bits = bits;
  job.need_prob = need_prob;
  job.abstain = abstain;
  job.threshold = abstain ? static_cast<float>(*abstain_below) : 0.0f;
  job.prob = return_prob ? prob.data_ptr<float>() : nullptr;
  job.packed = packed.data_ptr<uint8_t>();

  const auto pack = [&](int64_t r0, int64_t r1) {
    if (dtype == at::kFloat)
      dispatch<PackRows<Float32>>(job, r0, r1);
    else if (dtype == at::kBFloat16)
      dispatch<PackRows<BFloat16>>(job, r0, r1);
    else
      dispatch<PackRows<Float16>>(job, r0, r1);
  };
  // Tasks are runs of whole groups of 8 rows, so that each starts and ends on
  // a byte boundary of the stream, of at least ~64K elements. Threads take
  // the next task from a shared counter rather than a fixed half each: on a
  // shared machine a thread that starts late just takes fewer.
  const int64_t rows_per_task = 8 * std::max<int64_t>(1, (int64_t(1) << 16) / (8 * cols));
  const int64_t tasks = (n + rows_per_task - 1) / rows_per_task;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t t = next_task++; t < tasks; t = next_task++)
      pack(t * rows_per_task, std::min(n, (t + 1) * rows_per_task));
  });
  return {packed, prob};
}

}  // namespace

TALLYTRAIN_IMPL(CPU, m) { m.impl("pack_argmax", &pack_argmax_cpu); }

}  // namespace cpu
}  // namespace tallytrain
