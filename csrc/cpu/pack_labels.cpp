// pack_labels on the CPU: integer labels -> packed b-bit stream (docs/design.md §2).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>

#include "cpu_common.h"

namespace tallytrain {
namespace cpu {
namespace {

template <typename T>
void pack_rows(const T* labels, int64_t n, int64_t num_symbols, int b, uint8_t* out) {
  // Range check first (a separate cheap pass) so that an error leaves no
  // half-written output behind and names the first bad position.
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, 1 << 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t v = static_cast<int64_t>(labels[i]);
      if (v < 0 || v >= num_symbols) {
        record_first(first_bad, i);
        break;
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < n) fail_label_out_of_range(bad, static_cast<int64_t>(labels[bad]), num_symbols);
  // Parallel over groups of 8 rows: a group's b bits per row are exactly b
  // whole bytes, so every task starts on a byte boundary and threads never
  // share a byte, however parallel_for splits the range.
  const int64_t groups = (n + 7) / 8;
  at::parallel_for(0, groups, (1 << 15) / 8, [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * 8, r1 = std::min(n, g1 * 8);
    BitWriter w(out + g0 * b);
    for (int64_t i = r0; i < r1; ++i) w.put(static_cast<uint64_t>(labels[i]), b);
    w.flush();
  });
}

at::Tensor pack_labels_cpu(const at::Tensor& labels, int64_t num_symbols) {
  const int b = check_pack_labels_args(labels, num_symbols);
  const at::Tensor lab = labels.contiguous();
  const int64_t n = lab.numel();
  at::Tensor out = at::empty({packed_bytes(n, b)}, labels.options().dtype(at::kByte));
  AT_DISPATCH_INTEGRAL_TYPES(lab.scalar_type(), "pack_labels", [&] {
    pack_rows<scalar_t>(lab.data_ptr<scalar_t>(), n, num_symbols, b, out.data_ptr<uint8_t>());
  });
  return out;
}

}  // namespace

TALLYTRAIN_IMPL(CPU, m) { m.impl("pack_labels", &pack_labels_cpu); }

}  // namespace cpu
}  // namespace tallytrain
