// Portable SIMD for the CPU kernels.
//
// The hot loops are written once with GCC/Clang vector extensions on 64-byte
// vectors (16 x 32-bit or 32 x 16-bit lanes). The compiler lowers them to the
// ISA of the function that inlines them: one zmm register per vector with
// AVX-512, two ymm with AVX2, four xmm with SSE2 or NEON. Entry points marked
// TT_SIMD_CLONES are compiled once per x86-64 level and picked at load time
// (GCC target_clones / ifunc), so one binary runs on any x86-64 and uses
// AVX-512 where the CPU has it. Everything they call must be TT_INLINE so it is
// compiled for the clone's ISA too. Other compilers and architectures get one
// portable build of the same code.
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
// x86-64-v4: AVX-512 F/BW/DQ/VL; x86-64-v3: AVX2, FMA, F16C; default: SSE2.
#define TT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TT_SIMD_CLONES
#endif

#define TT_INLINE inline __attribute__((always_inline))

// GCC warns that returning a 64-byte vector changes the ABI where AVX-512 is
// off; no such call exists because every helper is inlined. (Vector
// parameters are passed by reference, which avoids the matching note.)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tallytrain {
namespace cpu {
namespace simd {

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));
typedef int16_t i16x32 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

constexpr int kVectorBytes = 64;

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

// Lane index vectors, for masking the unused lanes of a partial vector.
TT_INLINE i32x16 iota32() { return i32x16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
TT_INLINE i16x32 iota16() {
  return i16x32{0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
}

// iota of the unsigned lane type U.
template <typename U>
TT_INLINE U lane_index() {
  if constexpr (sizeof(U) / sizeof(U{}[0]) == 16) return (U)iota32();
  else return (U)iota16();
}

// Horizontal reductions, by halving (H8 / H4: the vector types of 8 and 4
// lanes of the element type).
template <typename H8, typename H4, typename V>
TT_INLINE auto hmax_of_16(const V& v) {
  const H8 a = vmax(half<H8>(v, 0), half<H8>(v, 1));
  const H4 b = vmax(half<H4>(a, 0), half<H4>(a, 1));
  const auto c = b[0] > b[1] ? b[0] : b[1];
  const auto d = b[2] > b[3] ? b[2] : b[3];
  return c > d ? c : d;
}

TT_INLINE uint32_t hmax(const u32x16& v) { return hmax_of_16<u32x8, u32x4>(v); }

TT_INLINE uint16_t hmax(const u16x32& v) {
  const u16x16 a = vmax(half<u16x16>(v, 0), half<u16x16>(v, 1));
  const u16x8 b = vmax(half<u16x8>(a, 0), half<u16x8>(a, 1));
  uint16_t m = b[0];
  for (int i = 1; i < 8; ++i) m = b[i] > m ? b[i] : m;
  return m;
}

// Largest lane of a vector with no NaN lane.
TT_INLINE float hmax(const f32x16& v) { return hmax_of_16<f32x8, f32x4>(v); }

TT_INLINE float hsum(const f32x16& v) {
  const f32x8 a = half<f32x8>(v, 0) + half<f32x8>(v, 1);
  const f32x4 b = half<f32x4>(a, 0) + half<f32x4>(a, 1);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Widening of 16-bit lanes: lanes [16*upper, 16*upper + 16) as 32-bit lanes.
TT_INLINE u32x16 widen(const u16x32& v, int upper) {
  return __builtin_convertvector(half<u16x16>(v, upper), u32x16);
}

// Orderable keys, lane-wise: the same maps as key_f32 / key_f16bits in
// tallytrain/common.h (key(a) > key(b) exactly when torch.argmax prefers a at
// a later index; -0.0 maps to +0.0; every NaN maps to the largest key), written
// with lane operations so that they vectorise.
TT_INLINE u32x16 keys_f32(const u32x16& u) {
  const u32x16 mag = u & 0x7fffffffu;
  const u32x16 sign = (u32x16)((i32x16)u >> 31);  // all ones where negative
  u32x16 k = u ^ (sign | 0x80000000u);
  k = mag == 0u ? 0x80000000u : k;
  return mag > 0x7f800000u ? 0xffffffffu : k;
}

template <uint16_t kExpMask>
TT_INLINE u16x32 keys_f16bits(const u16x32& h) {
  const u16x32 mag = h & uint16_t(0x7fff);
  const u16x32 sign = (u16x32)((i16x32)h >> 15);
  u16x32 k = h ^ (sign | uint16_t(0x8000));
  k = mag == uint16_t(0) ? uint16_t(0x8000) : k;
  return mag > kExpMask ? uint16_t(0xffff) : k;
}

// Float values of bfloat16 / float16 bits held in 32-bit lanes.
TT_INLINE f32x16 bf16_to_f32(const u32x16& h) { return (f32x16)(h << 16); }

TT_INLINE f32x16 f16_to_f32(const u32x16& h) {
  const u32x16 sign = (h & 0x8000u) << 16;
  const u32x16 em = h & 0x7fffu;  // exponent and mantissa
  // Normal numbers: rebias the exponent by 127 - 15; inf/NaN: to 255.
  u32x16 bits = (em << 13) + 0x38000000u;
  bits = em >= 0x7c00u ? bits + 0x38000000u : bits;
  // Zero and subnormals: the mantissa times 2^-24, exactly.
  const f32x16 sub = __builtin_convertvector((i32x16)em, f32x16) * 0x1p-24f;
  bits = em < 0x0400u ? (u32x16)sub : bits;
  return (f32x16)(bits | sign);
}

// e^x lane-wise for x <= 0 (the softmax exponents x - max). Range reduction
// x = n*ln2 + r, |r| <= ln2/2, and the Cephes expf polynomial (about 1 ulp);
// inputs below -87 (including -inf) give about 1e-38 instead of a denormal or
// zero, which no sum that includes e^0 = 1 can notice.
TT_INLINE f32x16 exp_nonpositive(const f32x16& x_in) {
  const f32x16 x = x_in < -87.0f ? -87.0f : x_in;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const f32x16 t = x * 1.44269504088896341f + kRound;
  const f32x16 n = t - kRound;
  const i32x16 n_int = (i32x16)t - 0x4b400000;  // bits of kRound
  f32x16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  f32x16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f32x16 e = p * (r * r) + r + 1.0f;
  return (f32x16)((i32x16)e + (n_int << 23));  // times 2^n
}

}  // namespace simd
}  // namespace cpu
}  // namespace tallytrain
