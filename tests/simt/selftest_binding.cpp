// Python bindings of selftest.cu (tests/ops/test_simt.py): int32 tensors in and
// out; faults come back as the error message (empty when the launch ran).
#include <torch/extension.h>

#include <cuda_runtime.h>

namespace selftest {
cudaError_t launch_warp_sums(const int* x, int n, int* out);
cudaError_t launch_block_scan(const int* x, int n, int* out);
cudaError_t launch_match_counts(const int* x, int n, int* out);
cudaError_t launch_sum_past_end(const int* x, int n, int* out);
cudaError_t launch_read_fresh_shared(uint32_t* out, int blocks);
cudaError_t launch_shuffle_widths(const int* x, int n, int* out);
cudaError_t launch_order_dependent(const int* unused, int blocks, int* out);
cudaError_t launch_fault(int which, int* flag, int* out);
}  // namespace selftest

namespace {

using Launcher = cudaError_t (*)(const int*, int, int*);

torch::Tensor run(Launcher launch, const torch::Tensor& x, int64_t out_size) {
  TORCH_CHECK(x.dtype() == torch::kInt && x.dim() == 1 && x.is_contiguous(), "x: 1-D int32");
  torch::Tensor out = torch::zeros({out_size}, torch::kInt);
  const cudaError_t err =
      launch(x.data_ptr<int>(), static_cast<int>(x.numel()), out.data_ptr<int>());
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

std::string fault(int which) {
  int flag = 0;
  int out[2048] = {};
  const cudaError_t err = selftest::launch_fault(which, &flag, out);
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

torch::Tensor read_fresh_shared(int blocks) {
  torch::Tensor out = torch::zeros({blocks, 2, 32}, torch::kInt);
  const cudaError_t err =
      selftest::launch_read_fresh_shared(reinterpret_cast<uint32_t*>(out.data_ptr<int>()), blocks);
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

torch::Tensor order_dependent(int blocks) {
  torch::Tensor out = torch::zeros({blocks}, torch::kInt);
  const cudaError_t err = selftest::launch_order_dependent(nullptr, blocks, out.data_ptr<int>());
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("warp_sums", [](const torch::Tensor& x) {
    return run(selftest::launch_warp_sums, x, x.numel() / 32);
  });
  m.def("block_scan", [](const torch::Tensor& x) {
    return run(selftest::launch_block_scan, x, x.numel());
  });
  m.def("match_counts", [](const torch::Tensor& x) {
    return run(selftest::launch_match_counts, x, x.numel());
  });
  m.def("sum_past_end", [](const torch::Tensor& x) {
    return run(selftest::launch_sum_past_end, x, 1);
  });
  m.def("shuffle_widths", [](const torch::Tensor& x) {
    return run(selftest::launch_shuffle_widths, x, 162);
  });
  m.def("read_fresh_shared", &read_fresh_shared);
  m.def("order_dependent", &order_dependent);
  m.def("fault", &fault);
}
