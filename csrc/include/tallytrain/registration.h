// Kernel registrations that wait until Python has checked the build.
//
// TORCH_LIBRARY_IMPL registers its kernels while the shared library loads,
// before tallytrain/ops/_backend.py can compare the torch the extension was
// built against with the torch that is running; a kernel built for another
// torch must never serve. TALLYTRAIN_IMPL(key, m) { m.impl(...); } reads the
// same but only records its block; register_kernels() (module.cpp, called by
// _backend.py once the versions agree) runs every recorded block on a
// torch::Library of its own, as TORCH_LIBRARY_IMPL would have.
#pragma once
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace tallytrain {

using KernelBlock = void (*)(torch::Library&);

struct PendingKernels {
  c10::DispatchKey key;
  KernelBlock block;
  const char* file;
  uint32_t line;
};

// Every block recorded while the library loaded (one list for the whole
// shared library: an inline function's static).
inline std::vector<PendingKernels>& pending_kernels() {
  static std::vector<PendingKernels> pending;
  return pending;
}

struct RecordKernels {
  RecordKernels(c10::DispatchKey key, KernelBlock block, const char* file, uint32_t line) {
    pending_kernels().push_back({key, block, file, line});
  }
};

}  // namespace tallytrain

#define TALLYTRAIN_IMPL_CONCAT_(a, b) a##b
#define TALLYTRAIN_IMPL_CONCAT(a, b) TALLYTRAIN_IMPL_CONCAT_(a, b)
#define TALLYTRAIN_IMPL(key, m) \
  TALLYTRAIN_IMPL_(key, m, TALLYTRAIN_IMPL_CONCAT(tallytrain_kernels_, __COUNTER__))
#define TALLYTRAIN_IMPL_(key, m, uid)                                                   \
  static void TALLYTRAIN_IMPL_CONCAT(uid, _block)(torch::Library&);                     \
  static const ::tallytrain::RecordKernels TALLYTRAIN_IMPL_CONCAT(uid, _record)(        \
      c10::DispatchKey::key, &TALLYTRAIN_IMPL_CONCAT(uid, _block), __FILE__, __LINE__); \
  static void TALLYTRAIN_IMPL_CONCAT(uid, _block)(torch::Library & m)
