// pack_labels and unpack_labels for CUDA tensors. Both validate their input
// on the device and read one flag back to raise ValueError, so each call
// synchronises the current stream once (only to validate).
#include "binding.h"

namespace tallytrain {
namespace cuda {
namespace {

at::Tensor pack_labels_cuda(const at::Tensor& labels, int64_t num_symbols) {
  const int b = check_pack_labels_args(labels, num_symbols);
  const DeviceGuard guard(labels.device());
  const at::Tensor lab = labels.contiguous();
  const int64_t n = lab.numel();
  at::Tensor out = at::empty({packed_bytes(n, b)}, labels.options().dtype(at::kByte));
  if (n == 0) return out;
  const at::Tensor flag = first_bad_flag(lab.device());
  PackLabelsArgs args;
  args.labels = lab.data_ptr();
  args.dtype = int_type(lab.scalar_type());
  args.n = n;
  args.num_symbols = num_symbols;
  args.bits = b;
  args.out = out.data_ptr<uint8_t>();
  args.out_bytes = out.numel();
  args.first_bad = flag_ptr(flag);
  TALLYTRAIN_CUDA_CHECK(launch_pack_labels(args, current_stream()));
  const int64_t bad = read_first_bad(flag);
  if (bad >= 0) fail_label_out_of_range(bad, lab[bad].item<int64_t>(), num_symbols);
  return out;
}

at::Tensor unpack_labels_cuda(const at::Tensor& packed, int64_t n, int64_t num_symbols) {
  const int b = check_unpack_args(packed, n, num_symbols);
  const DeviceGuard guard(packed.device());
  const at::Tensor stream = packed.contiguous();
  at::Tensor out = at::empty({n}, packed.options().dtype(at::kLong));
  if (n == 0) return out;
  // Symbols >= num_symbols exist only when num_symbols is not a power of two.
  const bool check = (int64_t(1) << b) != num_symbols;
  const at::Tensor flag = check ? first_bad_flag(stream.device()) : at::Tensor();
  UnpackLabelsArgs args;
  args.packed = stream.data_ptr<uint8_t>();
  args.n = n;
  args.num_symbols = num_symbols;
  args.bits = b;
  args.out = out.data_ptr<int64_t>();
  args.first_bad = check ? flag_ptr(flag) : nullptr;
  TALLYTRAIN_CUDA_CHECK(launch_unpack_labels(args, current_stream()));
  if (check) {
    const int64_t bad = read_first_bad(flag);
    if (bad >= 0) fail_symbol_out_of_range("packed", out[bad].item<int64_t>(), bad, num_symbols);
  }
  return out;
}

}  // namespace

TALLYTRAIN_CUDA_IMPL(m) {
  m.impl("pack_labels", &pack_labels_cuda);
  m.impl("unpack_labels", &unpack_labels_cuda);
}

}  // namespace cuda
}  // namespace tallytrain
