// Portable SIMD for the CPU kernels, and the dispatch over CPU levels.
//
// Vectorised loops are written once, as templates over an Isa: the vector
// types (GCC/Clang vector extensions) that fill one register of a level
// (cpu_level.h): 64 bytes at v4 (AVX-512), 32 at v3 (AVX2), 16 at v2 and at
// the SSE2 baseline, and 16 elsewhere (NEON on aarch64). A vector is never
// wider than the level's registers: GCC does a vector operation the target
// has no instruction for lane by lane, so 64-byte vectors compiled for AVX2
// turned every compare and select into scalar cmp/sete and lane inserts.
//
// dispatch<Kernel>(args...) calls Kernel::run<Isa<L>>(args...) for the active
// level L, from a copy compiled for L (a function with L's target attribute:
// one per level, chosen by a switch, so that a level can be forced at run
// time, which GCC's target_clones cannot). Kernel::run and everything it
// calls must be TT_INLINE (or inlined) to be compiled for the level too; a
// call that is not inlined runs the build's baseline code.
#pragma once
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "cpu_level.h"

#define TT_INLINE inline __attribute__((always_inline))

// GCC notes that passing a 64-byte vector by value changes the ABI where
// AVX-512 is off; vectors only pass between inlined functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tallytrain {
namespace cpu {
namespace simd {

// A vector of kBytes / sizeof(T) lanes of T.
template <typename T, int kBytes>
struct VecOf {
  typedef T type __attribute__((vector_size(kBytes)));
};
template <typename T, int kBytes>
using Vec = typename VecOf<T, kBytes>::type;

template <typename V>
using Lane = std::remove_cv_t<std::remove_reference_t<decltype(V{}[0])>>;
template <typename V>
constexpr int kLanes = sizeof(V) / sizeof(Lane<V>);
// As many lanes as V, of type T.
template <typename T, typename V>
using Like = Vec<T, int(kLanes<V> * sizeof(T))>;

constexpr int register_bytes(Level level) {
  return level == Level::kV4 ? 64 : level == Level::kV3 ? 32 : 16;
}

// The vectors of one register at level L.
template <Level L>
struct Isa {
  static constexpr Level kLevel = L;
  static constexpr int kBytes = register_bytes(L);
  using u32 = Vec<uint32_t, kBytes>;
  using i32 = Vec<int32_t, kBytes>;
  using f32 = Vec<float, kBytes>;
  using u16 = Vec<uint16_t, kBytes>;
  using i16 = Vec<int16_t, kBytes>;
};

// ---- dispatch ----------------------------------------------------------------- //

// Compiled<L>::run<K>(args...): K::run<Isa<L>>(args...) compiled for L.
// Arguments pass by value (pointers, integers, small structs).
template <Level L>
struct Compiled;

#define TT_COMPILED_LEVEL(level, target_attribute)                       \
  template <>                                                            \
  struct Compiled<level> {                                               \
    template <class K, class... A>                                       \
    target_attribute __attribute__((noinline)) static auto run(A... a) { \
      return K::template run<Isa<level>>(a...);                          \
    }                                                                    \
  };

TT_COMPILED_LEVEL(Level::kBaseline, )
#if TT_X86_LEVELS
TT_COMPILED_LEVEL(Level::kV2, __attribute__((target("arch=x86-64-v2"))))
TT_COMPILED_LEVEL(Level::kV3, __attribute__((target("arch=x86-64-v3"))))
TT_COMPILED_LEVEL(Level::kV4, __attribute__((target("arch=x86-64-v4"))))
#endif
#undef TT_COMPILED_LEVEL

template <class K, class... A>
TT_INLINE auto dispatch(A... a) {
#if TT_X86_LEVELS
  switch (active_level()) {
    case Level::kV4:
      return Compiled<Level::kV4>::run<K>(a...);
    case Level::kV3:
      return Compiled<Level::kV3>::run<K>(a...);
    case Level::kV2:
      return Compiled<Level::kV2>::run<K>(a...);
    case Level::kBaseline:
      break;
  }
#endif
  return Compiled<Level::kBaseline>::run<K>(a...);
}

// ---- loads and lanes ----------------------------------------------------------- //

// Unaligned load of one vector.
template <typename V>
TT_INLINE V load(const void* p) {
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
}

// The first `count` lanes loaded from p (count < lanes), the rest zero; never
// reads past p + count elements.
template <typename V, typename T>
TT_INLINE V load_partial(const T* p, int count) {
  V v = {};
  memcpy(&v, p, sizeof(T) * count);
  return v;
}

// Lower or upper half of a vector as a vector of half the size.
template <typename H, typename V>
TT_INLINE H half(const V& v, int upper) {
  H h;
  memcpy(&h, reinterpret_cast<const char*>(&v) + upper * sizeof(H), sizeof(H));
  return h;
}

template <typename V>
TT_INLINE V vmax(const V& a, const V& b) {
  return a > b ? a : b;
}

template <typename V>
TT_INLINE V vmin(const V& a, const V& b) {
  return a < b ? a : b;
}

// Lanes of a float vector that are finite (neither infinite nor NaN), as a
// mask: the magnitude's bits below +inf's (a signed compare: both below 2^31).
template <typename F>
TT_INLINE auto finite(const F& x) {
  using I = Like<int32_t, F>;
  return ((I)x & 0x7fffffff) < 0x7f800000;
}

// Lane i holds i (a constant).
template <typename V, size_t... I>
TT_INLINE V iota_of(std::index_sequence<I...>) {
  return V{static_cast<Lane<V>>(I)...};
}
template <typename V>
TT_INLINE V iota() {
  return iota_of<V>(std::make_index_sequence<kLanes<V>>());
}

// ---- horizontal reductions ------------------------------------------------------ //

// v with its lanes moved down by kBy (lane i takes lane i + kBy): the top
// lanes wrap around, or with kZeroFill are zero (a byte shift, which SSE2
// has for any kBy).
template <int kBy, bool kZeroFill, typename V, size_t... I>
TT_INLINE V lanes_down(const V& v, std::index_sequence<I...>) {
  constexpr int n = kLanes<V>;
  if constexpr (kZeroFill)
    return __builtin_shufflevector(v, V{}, (I + kBy < n ? I + kBy : n)...);
  else
    return __builtin_shufflevector(v, v, ((I + kBy) % n)...);
}

// Largest lane (of a vector without NaN): halving to 16 bytes, then moving
// lanes within the register (for unsigned lanes zeros may come in: they
// never exceed a lane).
template <typename V>
TT_INLINE Lane<V> hmax(const V& v) {
  if constexpr (sizeof(V) > 16) {
    using H = Vec<Lane<V>, int(sizeof(V) / 2)>;
    return hmax(vmax(half<H>(v, 0), half<H>(v, 1)));
  } else {
    constexpr bool kZeroFill = std::is_unsigned_v<Lane<V>>;
    constexpr auto lanes = std::make_index_sequence<kLanes<V>>();
    V m = v;
    if constexpr (kLanes<V> >= 16) m = vmax(m, lanes_down<8, kZeroFill>(m, lanes));
    if constexpr (kLanes<V> >= 8) m = vmax(m, lanes_down<4, kZeroFill>(m, lanes));
    m = vmax(m, lanes_down<2, kZeroFill>(m, lanes));
    m = vmax(m, lanes_down<1, kZeroFill>(m, lanes));
    return m[0];
  }
}

// Sum of the lanes of a float vector, by halving.
template <typename F>
TT_INLINE float hsum(const F& v) {
  if constexpr (sizeof(F) > 16) {
    using H = Vec<float, int(sizeof(F) / 2)>;
    return hsum(half<H>(v, 0) + half<H>(v, 1));
  } else {
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
}

// Whether any lane of an integer vector is nonzero (an OR of halves, then of
// two 64-bit lanes).
template <typename V>
TT_INLINE bool any_nonzero(const V& v) {
  using U = Vec<uint64_t, int(sizeof(V))>;
  if constexpr (sizeof(V) > 16) {
    using H = Vec<uint64_t, int(sizeof(V) / 2)>;
    const U u = (U)v;
    return any_nonzero(half<H>(u, 0) | half<H>(u, 1));
  } else {
    const U u = (U)v;
    return (u[0] | u[1]) != 0;
  }
}

// ---- conversions ------------------------------------------------------------------ //

// Lanes [n*kUpper, n*kUpper + n) of a vector of 2n 16-bit lanes, widened to
// n 32-bit lanes. GCC 12 does the conversion in one or two instructions on
// x86 (pmovzx, punpck) but lane by lane on aarch64, where interleaving with
// zeros (little-endian) is one zip; on x86 that shuffle went lane by lane
// for SSE2's 8-byte halves.
template <int kUpper, typename U16, size_t... I>
TT_INLINE Vec<uint32_t, int(sizeof(U16))> widen_of(const U16& v, std::index_sequence<I...>) {
  using H = Vec<uint16_t, int(sizeof(U16) / 2)>;
  using U32 = Vec<uint32_t, int(sizeof(U16))>;
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_convertvector(half<H>(v, kUpper), U32);
#else
  constexpr size_t n = kLanes<H>;
  return (U32)__builtin_shufflevector(half<H>(v, kUpper), H{}, (I % 2 ? n : I / 2)...);
#endif
}
template <int kUpper, typename U16>
TT_INLINE Vec<uint32_t, int(sizeof(U16))> widen(const U16& v) {
  return widen_of<kUpper>(v, std::make_index_sequence<kLanes<U16>>());
}

// Orderable keys, lane-wise: the same maps as key_f32 / key_f16bits in
// tallytrain/common.h (key(a) > key(b) exactly when torch.argmax prefers a at
// a later index; -0.0 maps to +0.0; every NaN maps to the largest key), written
// with lane operations so that they vectorise.
template <typename U>
TT_INLINE U keys_f32(const U& u) {
  const U mag = u & 0x7fffffffu;
  const U sign = (U)((Like<int32_t, U>)u >> 31);  // all ones where negative
  U k = u ^ (sign | 0x80000000u);
  k = mag == 0u ? 0x80000000u : k;
  return mag > 0x7f800000u ? 0xffffffffu : k;
}

template <uint16_t kExpMask, typename U>
TT_INLINE U keys_f16bits(const U& h) {
  const U mag = h & uint16_t(0x7fff);
  const U sign = (U)((Like<int16_t, U>)h >> 15);
  U k = h ^ (sign | uint16_t(0x8000));
  k = mag == uint16_t(0) ? uint16_t(0x8000) : k;
  return mag > kExpMask ? uint16_t(0xffff) : k;
}

// Float values of bfloat16 / float16 bits held in 32-bit lanes.
template <typename U>
TT_INLINE Like<float, U> bf16_to_f32(const U& h) {
  return (Like<float, U>)(h << 16);
}

template <typename U>
TT_INLINE Like<float, U> f16_to_f32(const U& h) {
  using F = Like<float, U>;
  const U sign = (h & 0x8000u) << 16;
  const U em = h & 0x7fffu;  // exponent and mantissa
  // Normal numbers: rebias the exponent by 127 - 15; inf/NaN: to 255.
  U bits = (em << 13) + 0x38000000u;
  bits = em >= 0x7c00u ? bits + 0x38000000u : bits;
  // Zero and subnormals: the mantissa times 2^-24, exactly.
  const F sub = __builtin_convertvector((Like<int32_t, U>)em, F) * 0x1p-24f;
  bits = em < 0x0400u ? (U)sub : bits;
  return (F)(bits | sign);
}

// e^x lane-wise for x <= 0 (the softmax exponents x - max). Range reduction
// x = n*ln2 + r, |r| <= ln2/2, and the Cephes expf polynomial (about 1 ulp);
// inputs below -87 (including -inf) give about 1e-38 instead of a denormal or
// zero, which no sum that includes e^0 = 1 can notice.
template <typename F>
TT_INLINE F exp_nonpositive(const F& x_in) {
  using I = Like<int32_t, F>;
  const F x = x_in < -87.0f ? -87.0f : x_in;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const F t = x * 1.44269504088896341f + kRound;
  const F n = t - kRound;
  const I n_int = (I)t - 0x4b400000;  // bits of kRound
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F e = p * (r * r) + r + 1.0f;
  return (F)((I)e + (n_int << 23));  // times 2^n
}

}  // namespace simd
}  // namespace cpu
}  // namespace tallytrain
