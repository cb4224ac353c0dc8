// tally for CUDA tensors: argument checks (weights are validated on the host:
// P numbers), then the fused unpack + tally of tally.cu. Where num_symbols is
// not a power of two a stream can hold invalid symbols; the kernel flags
// them and the binding reads the flag back (one synchronisation) to raise.
#include <optional>
#include <tuple>

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
  const TallyWeights w = check_tally_weights(weights, peers);
  const bool wide = w.sum > static_cast<uint64_t>(std::numeric_limits<int32_t>::max());
  const at::Tensor weights_dev = w.host.defined() ? w.host.to(votes.device()) : at::Tensor();

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
      fail_symbol_out_of_range("votes", symbol, bad, num_symbols);
    }
  }
  return {label, count, total, runner_up};
}

}  // namespace

TALLYTRAIN_CUDA_IMPL(m) { m.impl("tally", &tally_cuda); }

}  // namespace cuda
}  // namespace tallytrain
