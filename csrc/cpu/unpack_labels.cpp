// unpack_labels on the CPU: a packed b-bit stream -> int64 labels (docs/design.md §2),
// the inverse of pack_labels. Each symbol is one unaligned 8-byte load at byte
// (i*b)/8, a shift by (i*b)%8 and a mask (b <= 32 here), so symbols decode
// independently and threads split the output freely.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "cpu_common.h"

namespace tallytrain {
namespace cpu {
namespace {

// Decodes symbols [i0, i1) into out; returns the first position in the range
// holding a symbol >= num_symbols, or i1.
int64_t unpack_range(const uint8_t* stream, int64_t nbytes, int b, int64_t num_symbols, int64_t i0,
                     int64_t i1, int64_t* out) {
  const uint64_t mask = (uint64_t(1) << b) - 1;
  // Symbols whose 8-byte window lies inside the stream:
  // floor(i*b/8) + 8 <= nbytes  <=>  i*b <= 8*nbytes - 57.
  const int64_t fast_end =
      nbytes >= 8 ? std::clamp<int64_t>((8 * nbytes - 57) / b + 1, i0, i1) : i0;
  // Every b-bit value is a valid symbol when num_symbols == 2^b.
  const bool check = static_cast<uint64_t>(num_symbols) <= mask;
  int64_t i = i0;
  uint64_t bit = static_cast<uint64_t>(i0) * b;
  for (; i < fast_end; ++i, bit += b) {
    uint64_t word;
    memcpy(&word, stream + (bit >> 3), 8);  // little-endian hosts only
    const uint64_t v = (word >> (bit & 7)) & mask;
    out[i] = static_cast<int64_t>(v);
    if (check && v >= static_cast<uint64_t>(num_symbols)) return i;
  }
  for (; i < i1; ++i) {
    const uint64_t v = read_symbol(stream, nbytes, i, b);
    out[i] = static_cast<int64_t>(v);
    if (check && v >= static_cast<uint64_t>(num_symbols)) return i;
  }
  return i1;
}

at::Tensor unpack_labels_cpu(const at::Tensor& packed, int64_t n, int64_t num_symbols) {
  const int b = check_unpack_args(packed, n, num_symbols);

  const at::Tensor stream = packed.contiguous();
  at::Tensor labels = at::empty({n}, packed.options().dtype(at::kLong));
  const uint8_t* in = stream.data_ptr<uint8_t>();
  const int64_t nbytes = stream.numel();
  int64_t* out = labels.data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    const int64_t bad = unpack_range(in, nbytes, b, num_symbols, i0, i1, out);
    if (bad < i1) record_first(first_bad, bad);
  });
  const int64_t bad = first_bad.load();
  if (bad < n) fail_symbol_out_of_range("packed", out[bad], bad, num_symbols);
  return labels;
}

}  // namespace

TALLYTRAIN_IMPL(CPU, m) { m.impl("unpack_labels", &unpack_labels_cpu); }

}  // namespace cpu
}  // namespace tallytrain
