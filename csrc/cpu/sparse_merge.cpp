// sparse_merge on the CPU (docs/design.md §3): the dense sum over peers, in peer
// order, of each peer's sparse vector (times counts[p] / sum(counts) when
// counts are given).
//
// The dense range is split into tiles across threads, without atomics: each
// thread zeroes its tile, then for each peer in order 0..P-1 binary-searches
// the tile's span in that peer's sorted indices and adds. Every element thus
// receives 0 + c_0 + c_1 + ... in the reference's order, and each c_p is
// rounded as the reference rounds it (value converted to the output dtype,
// then times the scale in the output dtype), so the result is bit-identical
// to the reference's index_add_ loop whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"

namespace tallytrain {
namespace cpu {
namespace {

constexpr int64_t kTile = int64_t(1) << 16;  // dense elements per parallel task

// Adds peer entries [lo, hi) into out, contrib = Out(value) (* scale).
template <typename Out, typename Value>
void add_peer(const int64_t* idx, const Value* val, int64_t lo, int64_t hi, bool scaled, Out scale,
              Out* out) {
  if (scaled) {
    for (int64_t j = lo; j < hi; ++j) out[idx[j]] += static_cast<Out>(val[j]) * scale;
  } else {
    for (int64_t j = lo; j < hi; ++j) out[idx[j]] += static_cast<Out>(val[j]);
  }
}

// Peer p's indices: in 0..size-1 and strictly increasing (contiguous).
void check_peer_indices(const at::Tensor& idx, int64_t size, int64_t p) {
  const int64_t k = idx.numel();
  if (k == 0) return;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  if (ip[0] < 0 || ip[k - 1] >= size) {
    const auto [lo, hi] = std::minmax_element(ip, ip + k);
    fail_indices_out_of_range(p, size, *lo, *hi);
  }
  bool increasing = true;
  for (int64_t j = 1; j < k; ++j) increasing &= ip[j] > ip[j - 1];
  if (!increasing) fail_indices_not_increasing(p);
}

at::Tensor sparse_merge_cpu(at::TensorList indices, at::TensorList values, int64_t size,
                            const std::optional<at::Tensor>& counts) {
  const std::vector<double> scales = check_merge_args(indices, values, size, counts);
  const int64_t peers = static_cast<int64_t>(indices.size());

  bool any_double = false;
  for (const auto& v : values) any_double |= v.scalar_type() == at::kDouble;
  const auto out_dtype = any_double ? at::kDouble : at::kFloat;

  std::vector<at::Tensor> idx(peers), val(peers);
  for (int64_t p = 0; p < peers; ++p) {
    if (const auto error = merge_peer_shape_error(indices[p], values[p], p)) error->raise();
    idx[p] = indices[p].contiguous();
    val[p] = values[p].contiguous();
    check_peer_indices(idx[p], size, p);
  }

  const auto device = peers ? indices[0].device() : at::Device(at::kCPU);
  at::Tensor out = at::empty({size}, at::TensorOptions().dtype(out_dtype).device(device));
  const bool scaled = counts.has_value();
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "sparse_merge", [&] {
    using Out = scalar_t;
    Out* op = out.data_ptr<Out>();
    at::parallel_for(0, size, kTile, [&](int64_t a, int64_t b) {
      std::fill(op + a, op + b, Out(0));
      for (int64_t p = 0; p < peers; ++p) {
        const int64_t* ip = idx[p].const_data_ptr<int64_t>();
        const int64_t k = idx[p].numel();
        const int64_t lo = std::lower_bound(ip, ip + k, a) - ip;
        const int64_t hi = std::lower_bound(ip + lo, ip + k, b) - ip;
        const Out scale = static_cast<Out>(scales[p]);
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, val[p].scalar_type(), "sparse_merge_peer", [&] {
              add_peer<Out>(ip, val[p].const_data_ptr<scalar_t>(), lo, hi, scaled, scale, op);
            });
      }
    });
  });
  return out;
}

}  // namespace

TALLYTRAIN_IMPL(CPU, m) { m.impl("sparse_merge", &sparse_merge_cpu); }

}  // namespace cpu
}  // namespace tallytrain
