// sparse_merge with CUDA tensors: the reference's checks in the reference's
// order (peer by peer), the index checks done on the device for all peers at
// once (one synchronisation), then one scatter launch per peer in peer order.
#include <ATen/ops/zeros.h>

#include <optional>

#include "binding.h"

namespace tallytrain {
namespace cuda {
namespace {

at::Tensor sparse_merge_cuda(at::TensorList indices, at::TensorList values, int64_t size,
                             const std::optional<at::Tensor>& counts) {
  // Per-peer scales, in double on the host like the reference.
  const std::vector<double> scales = check_merge_args(indices, values, size, counts);
  const int64_t peers = static_cast<int64_t>(indices.size());
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
    shape_error = merge_peer_shape_error(indices[checked], values[checked], checked);
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
    TALLYTRAIN_CUDA_CHECK(
        launch_sparse_merge_validate(reinterpret_cast<const IndexList*>(lists.data_ptr()), checked,
                                     size, max_length, flags.data_ptr<int>(), stream));
    const at::Tensor flags_host = flags.cpu();
    const int* fp = flags_host.data_ptr<int>();
    for (int64_t p = 0; p < checked; ++p) {
      if (fp[2 * p] != 0)
        fail_indices_out_of_range(p, size, idx[p].min().item<int64_t>(),
                                  idx[p].max().item<int64_t>());
      if (fp[2 * p + 1] != 0) fail_indices_not_increasing(p);
    }
  }
  if (shape_error) shape_error->raise();

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
