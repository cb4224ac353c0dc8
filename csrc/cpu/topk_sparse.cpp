// topk_sparse and topk_sparse_ef on the CPU (docs/design.md §3): the k entries of
// largest |x|, ties to the lower index, indices ascending; the _ef variant
// selects on acc = x + residual and leaves the unsent remainder in residual.
//
// |x| is compared through integer keys: a float's bits with the sign cleared
// order like |x| (+0 and -0 are equal), and a NaN's key lies above infinity's.
//  1. A deterministic stratified sample of the keys gives a threshold t such
//     that comfortably more than k keys are >= t (about 4 sigma over).
//  2. One parallel pass over x checks for NaN and collects the (bits, index)
//     of every entry whose key is >= t, block by block, so in index order.
//  3. With at least k candidates, nth_element finds the k-th largest key K
//     among them, and one scan in index order keeps every key > K and the
//     first k - #{key > K} keys == K: the indices come out ascending.
//  4. Only when the sample misled (fewer than k candidates, or far more than
//     planned, e.g. a mass of ties at t) an exact radix select over all keys
//     finds K, and a count-then-write pass emits the same selection.
// The result is exact in every case, and independent of the thread count
// and of the CPU level (the candidate pass and the residual update run at the
// level chosen at run time, simd.h).
//
// topk_sparse_ef reads x and residual in the candidate pass but writes
// residual only in a second pass, after the NaN check has passed: like the
// reference, a ValueError leaves residual untouched.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "simd.h"

namespace tallytrain {
namespace cpu {
namespace {

using namespace simd;

constexpr int64_t kBlock = int64_t(1) << 15;  // elements per parallel block
// Sample size: 1/16 of x within these bounds (all of a small x). Selecting in the sample costs
// about as much as the candidate pass over x, so a small x takes a small
// sample (bridge merges select in ~1e5 parameters every round).
constexpr int64_t kSampleSize = int64_t(1) << 15;
constexpr int64_t kMinSampleSize = int64_t(1) << 12;
constexpr double kSampleSigmas = 4.0;  // over-provisioning of the threshold

// Bits of each float type, the key of +infinity (every NaN key is larger), and
// x + residual rounded exactly as torch's CPU add rounds it (16-bit floats are
// added in float32 and rounded once).
template <typename T>
struct FloatTraits;
template <>
struct FloatTraits<float> {
  using Bits = uint32_t;
  static constexpr int kKeyBits = 31;
  static constexpr Bits kInfKey = 0x7f800000u;
  static float add(float a, float b) { return a + b; }
};
template <>
struct FloatTraits<double> {
  using Bits = uint64_t;
  static constexpr int kKeyBits = 63;
  static constexpr Bits kInfKey = 0x7ff0000000000000ull;
  static double add(double a, double b) { return a + b; }
};
template <>
struct FloatTraits<c10::Half> {
  using Bits = uint16_t;
  static constexpr int kKeyBits = 15;
  static constexpr Bits kInfKey = kHalfExpMask;
  static c10::Half add(c10::Half a, c10::Half b) {
    return c10::Half(static_cast<float>(a) + static_cast<float>(b));
  }
};
template <>
struct FloatTraits<c10::BFloat16> {
  using Bits = uint16_t;
  static constexpr int kKeyBits = 15;
  static constexpr Bits kInfKey = kBFloat16ExpMask;
  static c10::BFloat16 add(c10::BFloat16 a, c10::BFloat16 b) {
    return c10::BFloat16(static_cast<float>(a) + static_cast<float>(b));
  }
};

template <typename T>
using BitsOf = typename FloatTraits<T>::Bits;

template <typename T>
inline BitsOf<T> bits_of(T v) {
  BitsOf<T> b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// The values selected on: x itself, or x + residual; their bits one at a
// time, or (kVectors) as a vector V of bits from index i on.
template <typename T>
struct PlainValues {
  static constexpr bool kVectors = true;
  const T* x;
  BitsOf<T> operator()(int64_t i) const { return bits_of(x[i]); }
  template <typename V>
  TT_INLINE V bits(int64_t i) const {
    return load<V>(x + i);
  }
};
template <typename T>
struct SumValues {
  // 16-bit floats are added in float32 and rounded: one at a time.
  static constexpr bool kVectors = std::is_floating_point_v<T>;
  const T* x;
  const T* residual;
  BitsOf<T> operator()(int64_t i) const { return bits_of(FloatTraits<T>::add(x[i], residual[i])); }
  template <typename V>
  TT_INLINE V bits(int64_t i) const {
    using F = Like<T, V>;
    return (V)(load<F>(x + i) + load<F>(residual + i));
  }
};

template <typename T>
struct Keys {
  using Bits = BitsOf<T>;
  // Keys never have the top bit set, so signed compares (which every SIMD
  // level has) order them too.
  using Signed = std::make_signed_t<Bits>;
  static constexpr Bits kMask = static_cast<Bits>((uint64_t(1) << FloatTraits<T>::kKeyBits) - 1);
  static constexpr Bits kInf = FloatTraits<T>::kInfKey;
  static Bits key(Bits bits) { return bits & kMask; }
  static bool at_least(Bits key, Bits threshold) {
    return static_cast<Signed>(key) >= static_cast<Signed>(threshold);
  }
};

template <typename Bits>
struct Candidate {
  Bits bits;  // the value's bits, sign included
  int64_t index;
};

// ---- 1. threshold from a sample --------------------------------------------- //
// Sample i of s lies at a golden-ratio jitter inside the i-th of s equal
// strata: spread like random picks, immune to periodic data, reproducible.
inline int64_t sample_position(int64_t i, int64_t s, int64_t m) {
  // The fractional part, as fmod(v, 1.0) gives it (exactly, for v >= 0), but
  // without libm's fmod, which cost 2 ms per 32K-entry sample (measured).
  const double v = static_cast<double>(i) * 0.6180339887498949;
  const double jitter = v - std::floor(v);
  const auto pos = static_cast<int64_t>((static_cast<double>(i) + jitter) *
                                        (static_cast<double>(m) / static_cast<double>(s)));
  return std::min(pos, m - 1);
}

// A key t such that about k + 4 sigma entries of x have key >= t (estimated
// from the sample), and that estimate in *expected.
template <typename T, typename Values>
BitsOf<T> sample_threshold(const Values& values, int64_t m, int64_t k, int64_t* expected) {
  using K = Keys<T>;
  const int64_t s = m <= 4 * kMinSampleSize ? m : std::clamp(m / 16, kMinSampleSize, kSampleSize);
  std::vector<BitsOf<T>> keys(s);
  at::parallel_for(0, s, 4096, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) keys[i] = K::key(values(s == m ? i : sample_position(i, s, m)));
  });
  const double mean = static_cast<double>(s) * static_cast<double>(k) / static_cast<double>(m);
  const auto rank = static_cast<int64_t>(std::ceil(mean + kSampleSigmas * std::sqrt(mean) + 2));
  if (rank >= s) {
    *expected = m;
    return 0;
  }
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end(), std::greater<>());
  *expected = static_cast<int64_t>(std::ceil(static_cast<double>(m) * rank / s));
  return keys[rank - 1];
}

// ---- 2. candidate pass ------------------------------------------------------- //
template <typename Bits>
struct Scan {
  std::vector<std::vector<Candidate<Bits>>> blocks;  // per block, in index order
  int64_t count = 0;
  bool overflow = false;  // more than `cap` candidates: the lists are incomplete
  int64_t first_nan = -1;
};

// Top bits set in the lanes of the L entries from i on whose key is >= the
// threshold, `below` = threshold - 1 in every lane (see ScanBlock).
template <typename T, typename V, typename Values>
TT_INLINE V hits(const Values& values, int64_t i, const V& below) {
  constexpr auto kTop = Lane<V>(Lane<V>(1) << (8 * sizeof(Lane<V>) - 1));
  return (below - (values.template bits<V>(i) & Keys<T>::kMask)) & kTop;
}

// Entries [i0, i1) whose key is >= threshold, in index order: appended to
// *out while `collect`, until it holds more than cap (the caller then sees
// the overflow). Returns the index of the first NaN, or -1 (nothing after a
// NaN matters). Compiled for each CPU level: where the values load as
// vectors, the keys are tested four vectors at a time, without compares:
// key >= t exactly when t - 1 - key has its top bit set (keys and t are
// below 2^(bits-1); t = 0 wraps to all ones), so the test is a subtraction,
// and a group is skipped when the OR of its differences has no top bit set.
template <typename T, typename Values>
struct ScanBlock {
  template <class S>
  static TT_INLINE int64_t run(const Values* values_, int64_t i0, int64_t i1, BitsOf<T> threshold,
                               bool collect, int64_t cap, std::vector<Candidate<BitsOf<T>>>* out) {
    using K = Keys<T>;
    using Bits = BitsOf<T>;
    const Values& values = *values_;
    // Returns false at a NaN.
    const auto take = [&](int64_t i) {
      const Bits bits = values(i);
      const Bits key = K::key(bits);
      if (!K::at_least(key, threshold)) return true;
      if (key > K::kInf) return false;
      if (collect) {
        out->push_back({bits, i});
        collect = static_cast<int64_t>(out->size()) <= cap;
      }
      return true;
    };
    int64_t i = i0;
    if constexpr (Values::kVectors) {
      using V = Vec<Bits, S::kBytes>;
      constexpr int L = kLanes<V>;
      const V below = V{} + Bits(threshold - 1);
      for (; i + 4 * L <= i1; i += 4 * L) {
        const V h[4] = {hits<T>(values, i, below), hits<T>(values, i + L, below),
                        hits<T>(values, i + 2 * L, below), hits<T>(values, i + 3 * L, below)};
        if (!any_nonzero((h[0] | h[1]) | (h[2] | h[3]))) continue;
        for (int q = 0; q < 4; ++q) {
          if (!any_nonzero(h[q])) continue;
          for (int64_t j = i + q * L; j < i + (q + 1) * L; ++j)
            if (!take(j)) return j;
        }
      }
    }
    for (; i < i1; ++i)
      if (!take(i)) return i;
    return -1;
  }
};

// Collects every entry with key >= threshold (at most `cap` of them) and finds
// the first NaN. cap = 0 only checks for NaN.
template <typename T, typename Values>
Scan<BitsOf<T>> collect(const Values& values, int64_t m, BitsOf<T> threshold, int64_t cap) {
  using K = Keys<T>;
  using Bits = BitsOf<T>;
  // Every NaN key is >= this, so a NaN always reaches the slow path below.
  threshold = std::min<Bits>(threshold, K::kInf + 1);
  const int64_t num_blocks = (m + kBlock - 1) / kBlock;
  Scan<Bits> scan;
  scan.blocks.resize(num_blocks);
  std::atomic<int64_t> total{0}, first_nan{m};
  std::atomic<bool> overflow{cap == 0};
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kBlock, i1 = std::min(m, i0 + kBlock);
      auto& out = scan.blocks[blk];
      const bool collecting = !overflow.load(std::memory_order_relaxed);
      const int64_t nan =
          dispatch<ScanBlock<T, Values>>(&values, i0, i1, threshold, collecting, cap, &out);
      if (nan >= 0) record_first(first_nan, nan);
      const auto size = static_cast<int64_t>(out.size());
      if (collecting && (size > cap || total.fetch_add(size) + size > cap)) overflow = true;
    }
  });
  scan.count = total.load();
  scan.overflow = overflow.load();
  scan.first_nan = first_nan.load() < m ? first_nan.load() : -1;
  return scan;
}

// ---- 3. select among the candidates ------------------------------------------ //
template <typename T>
void select_candidates(const Scan<BitsOf<T>>& scan, int64_t k, int64_t* idx, BitsOf<T>* val) {
  using K = Keys<T>;
  using Bits = BitsOf<T>;
  std::vector<Bits> keys;
  keys.reserve(scan.count);
  for (const auto& block : scan.blocks)
    for (const auto& c : block) keys.push_back(K::key(c.bits));
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<>());
  const Bits kth = keys[k - 1];
  int64_t ties = k - std::count_if(keys.begin(), keys.end(), [&](Bits key) { return key > kth; });
  int64_t o = 0;
  for (const auto& block : scan.blocks) {
    for (const auto& c : block) {
      const Bits key = K::key(c.bits);
      if (key > kth || (key == kth && ties-- > 0)) {
        idx[o] = c.index;
        val[o] = c.bits;
        if (++o == k) return;
      }
    }
  }
}

// ---- 4. exact fallback ----------------------------------------------------------- //
// The k-th largest key over all of x by MSB-first radix select (16-bit
// digits), and how many of the top k equal it.
template <typename T, typename Values>
std::pair<BitsOf<T>, int64_t> radix_select(const Values& values, int64_t m, int64_t k) {
  using K = Keys<T>;
  using Bits = BitsOf<T>;
  constexpr int kKeyBits = FloatTraits<T>::kKeyBits;
  uint64_t prefix = 0;
  int64_t rank = k;  // rank wanted among keys that match the prefix
  for (int done = 0; done < kKeyBits;) {
    const int digit_bits = std::min(16, kKeyBits - done);
    const int shift = kKeyBits - done - digit_bits;
    const int64_t bins = int64_t(1) << digit_bits;
    std::vector<int64_t> hist(bins, 0);
    std::mutex mu;
    at::parallel_for(0, m, kBlock, [&](int64_t a, int64_t b) {
      std::vector<int64_t> local(bins, 0);
      for (int64_t i = a; i < b; ++i) {
        const uint64_t key = K::key(values(i));
        if ((key >> (shift + digit_bits)) == prefix) ++local[(key >> shift) & (bins - 1)];
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t d = 0; d < bins; ++d) hist[d] += local[d];
    });
    int64_t d = bins - 1;
    for (; d > 0 && hist[d] < rank; --d) rank -= hist[d];
    prefix = (prefix << digit_bits) | static_cast<uint64_t>(d);
    done += digit_bits;
  }
  return {static_cast<Bits>(prefix), rank};
}

// Writes, in index order, every entry with key > kth and the first `ties`
// entries with key == kth: count per block, then write at the block offsets.
template <typename T, typename Values>
void emit_exact(const Values& values, int64_t m, BitsOf<T> kth, int64_t ties, int64_t* idx,
                BitsOf<T>* val) {
  using K = Keys<T>;
  const int64_t num_blocks = (m + kBlock - 1) / kBlock;
  std::vector<int64_t> above(num_blocks), equal(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t gt = 0, eq = 0;
      for (int64_t i = blk * kBlock; i < std::min(m, (blk + 1) * kBlock); ++i) {
        const auto key = K::key(values(i));
        gt += key > kth;
        eq += key == kth;
      }
      above[blk] = gt;
      equal[blk] = eq;
    }
  });
  std::vector<int64_t> offset(num_blocks), take_equal(num_blocks);
  int64_t written = 0, ties_left = ties;
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    take_equal[blk] = std::min(equal[blk], ties_left);
    ties_left -= take_equal[blk];
    offset[blk] = written;
    written += above[blk] + take_equal[blk];
  }
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t o = offset[blk], eq_left = take_equal[blk];
      for (int64_t i = blk * kBlock; i < std::min(m, (blk + 1) * kBlock); ++i) {
        const auto bits = values(i);
        const auto key = K::key(bits);
        if (key > kth || (key == kth && eq_left-- > 0)) {
          idx[o] = i;
          val[o++] = bits;
        }
      }
    }
  });
}

// ---- driver ------------------------------------------------------------------ //
// residual[i] = x[i] + residual[i] for i < n, rounded as FloatTraits::add
// rounds, compiled for each CPU level (the compiler vectorises it).
template <typename T>
struct AddInto {
  template <class S>
  static TT_INLINE void run(const T* x, T* residual, int64_t n) {
    for (int64_t i = 0; i < n; ++i) residual[i] = FloatTraits<T>::add(x[i], residual[i]);
  }
};

// Selects the top k of `values` into idx / val (bits of T); `what` names the
// input in the NaN error.
template <typename T, typename Values>
void topk_into(const Values& values, int64_t m, int64_t k, const char* what, int64_t* idx,
               BitsOf<T>* val) {
  using Bits = BitsOf<T>;
  auto check_nan = [&](const Scan<Bits>& scan) {
    TORCH_CHECK_VALUE(scan.first_nan < 0, what, " contains NaN (first at index ", scan.first_nan,
                      ")");
  };
  if (k == 0 || k == m) {
    check_nan(collect<T>(values, m, Keys<T>::kInf + 1, 0));
    at::parallel_for(0, k, kBlock, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        idx[i] = i;
        val[i] = values(i);
      }
    });
    return;
  }
  int64_t expected = 0;
  const Bits threshold = sample_threshold<T>(values, m, k, &expected);
  // Room for several times the planned candidates; more means the sample was
  // misleading (or the threshold sits on a mass of ties): go exact instead.
  const int64_t cap = std::clamp(std::max(4 * expected, expected + 65536), k, m);
  const Scan<Bits> scan = collect<T>(values, m, threshold, cap);
  check_nan(scan);
  if (!scan.overflow && scan.count >= k) {
    select_candidates<T>(scan, k, idx, val);
  } else {
    const auto [kth, ties] = radix_select<T>(values, m, k);
    emit_exact<T>(values, m, kth, ties, idx, val);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_sparse_cpu(const at::Tensor& x, int64_t k) {
  check_topk_input(x, k);
  const at::Tensor xc = x.contiguous();
  at::Tensor idx = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor val = at::empty({k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_sparse", [&] {
    topk_into<scalar_t>(PlainValues<scalar_t>{xc.const_data_ptr<scalar_t>()}, xc.numel(), k, "x",
                        idx.data_ptr<int64_t>(),
                        reinterpret_cast<BitsOf<scalar_t>*>(val.data_ptr<scalar_t>()));
  });
  return {idx, val};
}

std::tuple<at::Tensor, at::Tensor> topk_sparse_ef_cpu(const at::Tensor& x,
                                                      const at::Tensor& residual, int64_t k) {
  check_topk_ef_args(x, residual, k);
  // A strided residual is updated through a contiguous copy written back.
  const at::Tensor work = residual.contiguous();
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.numel();
  at::Tensor idx = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor val = at::empty({k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_sparse_ef", [&] {
    using T = scalar_t;
    const T* xp = xc.const_data_ptr<T>();
    T* rp = work.data_ptr<T>();
    int64_t* ip = idx.data_ptr<int64_t>();
    topk_into<T>(SumValues<T>{xp, rp}, m, k, "x + residual", ip,
                 reinterpret_cast<BitsOf<T>*>(val.data_ptr<T>()));
    // residual := acc with the selected entries zeroed, block by block so the
    // zeroing hits cache. Only now, after every check has passed.
    at::parallel_for(0, m, kBlock, [&](int64_t a, int64_t b) {
      dispatch<AddInto<T>>(xp + a, rp + a, b - a);
      for (const int64_t* s = std::lower_bound(ip, ip + k, a); s < ip + k && *s < b; ++s)
        rp[*s] = T(0);
    });
  });
  if (!work.is_same(residual)) residual.copy_(work);
  return {idx, val};
}

}  // namespace

TALLYTRAIN_IMPL(CPU, m) {
  m.impl("topk_sparse", &topk_sparse_cpu);
  m.impl("topk_sparse_ef", &topk_sparse_ef_cpu);
}

}  // namespace cpu
}  // namespace tallytrain
