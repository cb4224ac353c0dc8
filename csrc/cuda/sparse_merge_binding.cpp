// sparse_merge with CUDA tensors: the reference's checks in the reference's
// order (peer by peer), the index checks done on the device for all peers at
// once (one synchronisation), then one scatter launch per peer in peer order.
#include <ATen/ops/zeros.h>

#include <optional>
#include <string>

#include "binding.h"

namespace tallytrain {
namespace cuda {
namespace {

bool is_topk_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A check of peer p that needs no data failed: TypeError or ValueError.
struct PeerError {
  bool type_error;
  std::string message;
};

// The checks of peer p that need no data, in the reference's order.
std::optional<PeerError> peer_shape_error(const at::Tensor& idx, const at::Tensor& val, int64_t p) {
  if (idx.scalar_type() != at::kLong)
    return PeerError{true, c10::str("indices[", p, "] must be int64, got ", idx.scalar_type())};
  if (!is_topk_float(val.scalar_type()))
    return PeerError{true, c10::str("values[", p, "] must be a floating tensor, got ",
                                    val.scalar_type())};
  if (idx.dim() != 1 || val.dim() != 1 || idx.sizes() != val.sizes())
    return PeerError{false, c10::str("indices[", p, "] and values[", p,
                                     "] must be 1-D of equal length, got ", idx.sizes(), " and ",
                                     val.sizes())};
  return std::nullopt;
}

at::Tensor sparse_merge_cuda(at::TensorList indices, at::TensorList values, int64_t size,
                             const std::optional<at::Tensor>& counts) {
  check_merge_args(indices, values, size, counts);
  const int64_t peers = static_cast<int64_t>(indices.size());

  // Per-peer scales, in double on the host like the reference.
  std::vector<double> scales(peers, 1.0);
  if (counts.has_value()) {
    const at::Tensor& c = *counts;
    const at::Tensor c_host = c.to(at::kCPU, at::kLong).contiguous();
    const int64_t* cp = c_host.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t p = 0; p < peers; ++p) {
      TORCH_CHECK_VALUE(cp[p] >= 0, "counts must be >= 0, got counts[", p, "] = ", cp[p]);
      total += cp[p];
    }
    TORCH_CHECK_VALUE(peers == 0 || total > 0, "counts must sum to a positive number");
    for (int64_t p = 0; p < peers; ++p)
      scales[p] = static_cast<double>(cp[p]) / static_cast<double>(total);
  }
  bool any_double = false;
  for (const at::Tensor& v : values) any_double = any_double || v.scalar_type() == at::kDouble;
  const at::ScalarType out_dtype = any_double ? at::kDouble : at::kFloat;
  if (peers == 0) return at::zeros({size}, at::TensorOptions().dtype(out_dtype));

  // Compute on the first CUDA device among the arguments; the result goes
  // where the reference puts it, on indices[0]'s device.
  c10::Device device = indices[0].device();
  for (const at::Tensor& t : indices)
    if (!on_device(device) && on_device(t.device())) device = t.device();
  for (const at::Tensor& t : values)
    if (!on_device(device) && on_device(t.device())) device = t.device();
  if (!on_device(device) && counts.has_value() && on_device(counts->device()))
    device = counts->device();
  TORCH_CHECK(on_device(device), "sparse_merge_cuda called without a CUDA tensor");
  const DeviceGuard guard(device);
  const cudaStream_t stream = current_stream();

  // Peers before the first one with a dtype or shape error have their index
  // lists checked on the device, all at once.
  int64_t checked = 0;
  std::optional<PeerError> shape_error;
  for (; checked < peers; ++checked) {
    shape_error = peer_shape_error(indices[checked], values[checked], checked);
    if (shape_error) break;
  }
  std::vector<at::Tensor> idx(checked);
  int64_t max_length = 0;
  at::Tensor lists_host = at::empty({checked, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* lp = lists_host.data_ptr<int64_t>();
  for (int64_t p = 0; p < checked; ++p) {
    idx[p] = indices[p].to(device).contiguous();
    lp[2 * p] = reinterpret_cast<int64_t>(idx[p].data_ptr<int64_t>());
    lp[2 * p + 1] = idx[p].numel();
    max_length = std::max(max_length, idx[p].numel());
  }
  if (checked > 0) {
    const at::Tensor lists = lists_host.to(device);
    at::Tensor flags = at::zeros({2 * checked}, at::TensorOptions().dtype(at::kInt).device(device));
    TALLYTRAIN_CUDA_CHECK(launch_sparse_merge_validate(
        reinterpret_cast<const IndexList*>(lists.data_ptr()), checked, size, max_length,
        flags.data_ptr<int>(), stream));
    const at::Tensor flags_host = flags.cpu();
    const int* fp = flags_host.data_ptr<int>();
    for (int64_t p = 0; p < checked; ++p) {
      TORCH_CHECK_VALUE(fp[2 * p] == 0, "indices[", p, "] must lie in 0..size-1 = ", size - 1,
                        ", got ", idx[p].min().item<int64_t>(), "..", idx[p].max().item<int64_t>());
      TORCH_CHECK_VALUE(fp[2 * p + 1] == 0, "indices[", p, "] must be strictly increasing");
    }
  }
  if (shape_error) {
    TORCH_CHECK_TYPE(!shape_error->type_error, shape_error->message);
    TORCH_CHECK_VALUE(false, shape_error->message);
  }

  at::Tensor out = at::zeros({size}, at::TensorOptions().dtype(out_dtype).device(device));
  for (int64_t p = 0; p < peers; ++p) {
    const at::Tensor val = values[p].to(device).contiguous();
    MergePeerArgs args;
    args.indices = idx[p].data_ptr<int64_t>();
    args.values = val.data_ptr();
    args.values_dtype = float_type(val.scalar_type());
    args.length = idx[p].numel();
    args.has_scale = counts.has_value();
    args.scale = scales[p];
    args.out = out.data_ptr();
    args.out_dtype = float_type(out_dtype);
    TALLYTRAIN_CUDA_CHECK(launch_sparse_merge_peer(args, stream));
  }
  return out.to(indices[0].device());
}

}  // namespace

TALLYTRAIN_CUDA_IMPL(m) { m.impl("sparse_merge", &sparse_merge_cuda); }

}  // namespace cuda
}  // namespace tallytrain
