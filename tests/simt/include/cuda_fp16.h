// IEEE half precision for tests/simt (see simt.h): the conversions the
// kernels use, rounding to nearest even like the device's.
#pragma once
#include <stdint.h>
#include <string.h>

struct __half {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline float __double2float_rn(double x) { return static_cast<float>(x); }
