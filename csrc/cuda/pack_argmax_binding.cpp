// pack_argmax for CUDA tensors: argument checks, then the fused kernel of
// pack_argmax.cu on the current stream.
#include <optional>
#include <tuple>

#include "binding.h"

namespace tallytrain {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> pack_argmax_cuda(const at::Tensor& logits, bool return_prob,
                                                    std::optional<double> abstain_below) {
  const int b = check_pack_argmax_args(logits, abstain_below);
  const at::ScalarType dtype = logits.scalar_type();
  const int64_t n = logits.size(0);
  const int64_t c = logits.size(1);
  const bool abstain = abstain_below.has_value();

  const DeviceGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor packed = at::empty({packed_bytes(n, b)}, logits.options().dtype(at::kByte));
  const bool need_prob = return_prob || abstain;
  at::Tensor prob = at::empty({need_prob ? n : 0}, logits.options().dtype(at::kFloat));
  if (n > 0) {
    Workspace workspace(x.device());
    PackArgmaxArgs args;
    args.logits = x.data_ptr();
    args.dtype = float_type(dtype);
    args.rows = n;
    args.cols = c;
    args.abstain = abstain;
    // torch compares a float32 tensor with a Python float in float32.
    args.abstain_below = abstain ? static_cast<float>(*abstain_below) : 0.f;
    args.bits = b;
    args.out = packed.data_ptr<uint8_t>();
    args.out_bytes = packed.numel();
    args.prob = need_prob ? prob.data_ptr<float>() : nullptr;
    TALLYTRAIN_CUDA_CHECK(launch_pack_argmax(args, workspace.allocator(), current_stream()));
  }
  if (!return_prob) prob = at::empty({0}, logits.options().dtype(at::kFloat));
  return {packed, prob};
}

}  // namespace

TALLYTRAIN_CUDA_IMPL(m) { m.impl("pack_argmax", &pack_argmax_cuda); }

}  // namespace cuda
}  // namespace tallytrain
