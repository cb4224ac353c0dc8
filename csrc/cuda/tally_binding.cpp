// tally for CUDA tensors: argument checks (weights are validated on the host:
// P numbers), then the fused unpack + tally of tally.cu. Where num_symbols is
// not a power of two a stream can hold invalid symbols; the kernel flags
// them and the binding reads the flag back (one synchronisation) to raise.
#include <optional>
#include <tuple>

#include <ATen/ops/empty.h>

#include "binding.h"

namespace tallytrain {
namespace cuda {
namespace {

using Tally = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tally tally_cuda(const at::Tensor& votes, int64_t n, int64_t num_classes,
                 const std::optional<at::Tensor>& weights, bool abstain) {
  const int b = check_tally_votes(votes, n, num_classes, abstain);
  const int64_t num_symbols = abstain ? num_classes + 1 : num_classes;
  const int64_t peers = votes.size(0);

  // Weights: P integers, checked and summed on the host. Counts fit in 32
  // bits unless the summed weight exceeds INT32_MAX.
  at::Tensor weights_dev;
  bool wide = peers > std::numeric_limits<int32_t>::max();
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK_TYPE(is_integer_dtype(w.scalar_type()), "weights must be an integer tensor, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == peers,
                      "weights must be 1-D with one entry per peer (", peers, "), got shape ",
                      w.sizes());
    const at::Tensor w_host = w.to(at::kCPU, at::kLong).contiguous();
    const int64_t* wp = w_host.data_ptr<int64_t>();
    int64_t sum = 0;
    for (int64_t p = 0; p < peers; ++p) {
      TORCH_CHECK_VALUE(wp[p] >= 0, "weights must be >= 0, got weights[", p, "] = ", wp[p]);
      sum = wp[p] > std::numeric_limits<int64_t>::max() - sum ? std::numeric_limits<int64_t>::max()
                                                               : sum + wp[p];
    }
    wide = wide || sum > std::numeric_limits<int32_t>::max();
    weights_dev = w_host.to(votes.device());
  }

  const DeviceGuard guard(votes.device());
  const auto i64 = votes.options().dtype(at::kLong);
  at::Tensor label = at::empty({n}, i64);
  at::Tensor count = at::empty({n}, i64);
  at::Tensor total = at::empty({n}, i64);
  at::Tensor runner_up = at::empty({n}, i64);
  if (n == 0) return {label, count, total, runner_up};

  const at::Tensor v = votes.contiguous();
  const bool check = (int64_t(1) << b) != num_symbols;
  const at::Tensor flag = check ? first_bad_flag(v.device()) : at::Tensor();
  Workspace workspace(v.device());
  TallyArgs args;
  args.votes = v.data_ptr<uint8_t>();
  args.peers = peers;
  args.n = n;
  args.num_classes = num_classes;
  args.abstain = abstain;
  args.bits = b;
  args.num_symbols = num_symbols;
  args.weights = weights_dev.defined() ? weights_dev.data_ptr<int64_t>() : nullptr;
  args.wide_counts = wide;
  args.label = label.data_ptr<int64_t>();
  args.count = count.data_ptr<int64_t>();
  args.total = total.data_ptr<int64_t>();
  args.runner_up = runner_up.data_ptr<int64_t>();
  args.first_bad = check ? flag_ptr(flag) : nullptr;
  TALLYTRAIN_CUDA_CHECK(launch_tally(args, workspace.allocator(), current_stream()));
  if (check) {
    const int64_t bad = read_first_bad(flag);
    if (bad >= 0) {
      // Position in the flattened [P, N] labels; read the symbol's bytes back.
      const int64_t p = bad / n, i = bad % n;
      const int64_t first = (i * b) >> 3, last = (i * b + b - 1) >> 3;
      const at::Tensor bytes = v[p].narrow(0, first, last - first + 1).cpu();
      uint64_t word = 0;
      for (int64_t k = 0; k <= last - first; ++k)
        word |= static_cast<uint64_t>(bytes.data_ptr<uint8_t>()[k]) << (8 * k);
      const int64_t symbol =
          static_cast<int64_t>((word >> ((i * b) & 7)) & ((uint64_t(1) << b) - 1));
      TORCH_CHECK_VALUE(false, "votes holds symbol ", symbol, " at position ", bad, ", outside 0..",
                        num_symbols - 1);
    }
  }
  return {label, count, total, runner_up};
}

}  // namespace

TALLYTRAIN_CUDA_IMPL(m) { m.impl("tally", &tally_cuda); }

}  // namespace cuda
}  // namespace tallytrain
