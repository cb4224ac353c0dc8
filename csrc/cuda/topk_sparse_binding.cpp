// topk_sparse and topk_sparse_ef for CUDA tensors: argument checks, then the
// sampled-threshold selection of topk_sparse.cu, which synchronises the
// stream once (to size the exact selection and to raise on NaN; a NaN leaves
// residual unchanged, as in the reference).
#include <tuple>

#include "binding.h"

namespace tallytrain {
namespace cuda {
namespace {

// residual: a contiguous tensor updated in place, or undefined for plain top-k.
std::tuple<at::Tensor, at::Tensor> run_topk(const at::Tensor& x, const at::Tensor& residual,
                                            int64_t k, const char* what) {
  const DeviceGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({k}, x.options());
  Workspace workspace(x.device());
  TopkArgs args;
  args.dtype = float_type(x.scalar_type());
  args.x = xc.data_ptr();
  args.residual = residual.defined() ? residual.data_ptr() : nullptr;
  args.m = xc.numel();
  args.k = k;
  args.out_indices = indices.data_ptr<int64_t>();
  args.out_values = values.data_ptr();
  int64_t nan_index = -1;
  TALLYTRAIN_CUDA_CHECK(launch_topk(args, workspace.allocator(), current_stream(), &nan_index));
  TORCH_CHECK_VALUE(nan_index < 0, what, " contains NaN (first at index ", nan_index, ")");
  return {indices, values};
}

std::tuple<at::Tensor, at::Tensor> topk_sparse_cuda(const at::Tensor& x, int64_t k) {
  check_topk_input(x, k);
  return run_topk(x, at::Tensor(), k, "x");
}

std::tuple<at::Tensor, at::Tensor> topk_sparse_ef_cuda(const at::Tensor& x,
                                                       const at::Tensor& residual, int64_t k) {
  check_topk_ef_args(x, residual, k);
  if (residual.is_contiguous()) return run_topk(x, residual, k, "x + residual");
  // Work on a contiguous copy and write it back.
  const at::Tensor work = residual.contiguous();
  auto result = run_topk(x, work, k, "x + residual");
  residual.copy_(work);
  return result;
}

}  // namespace

TALLYTRAIN_CUDA_IMPL(m) {
  m.impl("topk_sparse", &topk_sparse_cuda);
  m.impl("topk_sparse_ef", &topk_sparse_ef_cuda);
}

}  // namespace cuda
}  // namespace tallytrain
