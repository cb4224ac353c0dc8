// Helpers shared by the CPU and CUDA kernels: the bit layout of packed label
// streams (docs/design.md §2) and the orderable keys that reproduce torch.argmax.
// Compiled for host and device; includes no torch header so .cu files stay
// quick to build.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define TT_HD __host__ __device__ __forceinline__
#else
#define TT_HD inline
#endif

namespace tallytrain {

// ceil(log2(S)) for S >= 2.
TT_HD int bits_for(int64_t num_symbols) {
  int b = 0;
  uint64_t v = static_cast<uint64_t>(num_symbols - 1);
  while (v) {
    ++b;
    v >>= 1;
  }
  return b;
}

// Bytes of a stream of n symbols of b bits.
TT_HD int64_t packed_bytes(int64_t n, int b) { return (n * b + 7) / 8; }

// Symbol i of a stream of `nbytes` bytes holding b-bit symbols (b <= 57),
// least significant bit first. Never reads past the buffer: an 8-byte
// unaligned load where it fits, bytewise at the tail.
TT_HD uint64_t read_symbol(const uint8_t* stream, int64_t nbytes, int64_t i, int b) {
  const int64_t bit = i * b;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint64_t word = 0;
  if (byte + 8 <= nbytes) {
#if defined(__CUDA_ARCH__)
    for (int k = 0; k < 8; ++k) word |= static_cast<uint64_t>(stream[byte + k]) << (8 * k);
#else
    __builtin_memcpy(&word, stream + byte, 8);  // little-endian hosts only
#endif
  } else {
    for (int64_t k = 0; byte + k < nbytes; ++k)
      word |= static_cast<uint64_t>(stream[byte + k]) << (8 * k);
  }
  return (word >> shift) & ((uint64_t(1) << b) - 1);
}

// Orderable keys: key(a) > key(b) exactly when torch.argmax prefers a over b
// at a later index, i.e. a > b, or a is NaN and b is not. -0.0 maps to +0.0
// (they compare equal, so the first index wins) and every NaN maps to the
// largest key (the first NaN wins).
TT_HD uint32_t key_f32(uint32_t u) {
  u = (u == 0x80000000u) ? 0u : u;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t flip = (u & 0x80000000u) ? 0xffffffffu : 0x80000000u;
  return nan ? 0xffffffffu : (u ^ flip);
}

// 16-bit floats: exp_mask is the all-ones exponent (0x7c00 for float16,
// 0x7f80 for bfloat16).
TT_HD uint16_t key_f16bits(uint16_t h, uint16_t exp_mask) {
  h = (h == 0x8000u) ? uint16_t(0) : h;
  const bool nan = (h & 0x7fffu) > exp_mask;
  const uint16_t flip = (h & 0x8000u) ? uint16_t(0xffffu) : uint16_t(0x8000u);
  return nan ? uint16_t(0xffffu) : uint16_t(h ^ flip);
}

constexpr uint16_t kHalfExpMask = 0x7c00u;
constexpr uint16_t kBFloat16ExpMask = 0x7f80u;

// Float value of a 16-bit float's bits (for the top-1 probability).
TT_HD float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace tallytrain

// ---- Word-level packing (used by the CUDA kernels) -------------------------
namespace tallytrain {

// Word w (0 <= w < b) of the b little-endian 32-bit words that hold 32
// consecutive b-bit symbols (1 <= b <= 32) whose first symbol index is a
// multiple of 32: 32 symbols x b bits are exactly b words, so a group of 32
// rows can be written without touching its neighbours' words. Every
// sym[j] must be < 2**b.
TT_HD uint32_t pack_word32(const uint32_t* sym, int b, int w) {
  const int bit0 = 32 * w;
  const int first = bit0 / b;
  const int last = (bit0 + 31) / b;  // < 32 because bit0 + 31 < 32 * b
  uint64_t word = 0;
  for (int j = first; j <= last; ++j) {
    const int offset = j * b - bit0;  // in (-b, 32)
    const uint64_t s = sym[j];
    word |= offset >= 0 ? (s << offset) : (s >> -offset);
  }
  return static_cast<uint32_t>(word);
}

// Symbol i of a stream of b-bit symbols (1 <= b <= 32), reading only the
// 1 to 5 bytes that hold it, so it never reads past a stream that holds
// symbol i.
TT_HD uint32_t read_symbol_exact(const uint8_t* stream, int64_t i, int b) {
  const int64_t bit = i * b;
  const int64_t first = bit >> 3;
  const int64_t last = (bit + b - 1) >> 3;
  uint64_t word = 0;
  for (int64_t k = first; k <= last; ++k)
    word |= static_cast<uint64_t>(stream[k]) << (8 * (k - first));
  return static_cast<uint32_t>((word >> (bit & 7)) & ((uint64_t(1) << b) - 1));
}

}  // namespace tallytrain

#if defined(__CUDACC__)
namespace tallytrain {

// Stores 32-bit word `word` of a little-endian stream of out_bytes bytes
// (out 4-byte aligned): whole words with one store, the last partial word
// bytewise, words past the end not at all.
__device__ __forceinline__ void store_stream_word(uint8_t* out, int64_t out_bytes, int64_t word,
                                                  uint32_t value) {
  const int64_t byte = word * 4;
  if (byte + 4 <= out_bytes) {
    *reinterpret_cast<uint32_t*>(out + byte) = value;
  } else {
    for (int k = 0; k < 4 && byte + k < out_bytes; ++k)
      out[byte + k] = static_cast<uint8_t>(value >> (8 * k));
  }
}

}  // namespace tallytrain
#endif  // __CUDACC__
