// A CUDA execution model on the CPU, for testing the kernels of csrc/cuda/
// where no GPU is: tests/simt/build.py compiles every .cu file as C++ with
// this header (and the small cuda_runtime.h, cuda_fp16.h, math_constants.h
// and cuda/atomic beside it) after rewriting `k<<<grid, block, smem,
// stream>>>(args)` into `::simt::launch(k, ::simt::Config(...))(args)`, and
// adding calls to fresh_shared() after static __shared__ declarations and to
// launch_bounds() at the start of kernels that declare __launch_bounds__.
//
// What it models: every CUDA thread is a fiber with its own stack; the blocks
// of a grid run one after another, the threads of a block interleave only at
// __syncthreads, warp collectives (__shfl*_sync, __match_any_sync,
// __reduce_add_sync, __ballot_sync, __syncwarp) and __nanosleep, starting in
// index order in some blocks and in reverse in others. That is enough for
// the kernels' results to come out as on a GPU whenever the kernel is free of
// races, and it makes the programming errors a GPU leaves undefined fail
// loudly instead: a barrier some threads never reach or reach after others
// exited, a warp collective whose mask names a lane that exited or leaves out
// the caller, lanes that wait in different collectives (or the same one with
// another mask or width) and never converge, a shuffle from a lane outside
// the mask, a spin-wait on work that is never done, a launch with more
// threads than the device or the kernel's __launch_bounds__ allow or more
// dynamic shared memory than its limit. Shared memory, static and dynamic,
// starts every block filled with 0xCD, so that reading it before writing it
// shows. tests/ops/test_simt.py shows each of these.
//
// What it does not model: concurrency between blocks (a kernel that waits
// for a later block fails as a spin-wait never satisfied; one that waits for
// an earlier block, as a decoupled look-back does, works), memory ordering
// and data races, speed, and static shared memory's share of the 48 KiB
// limit. Device memory is host memory, so out-of-bounds accesses show only in
// the AddressSanitizer build (TALLYTRAIN_SIMT_INSTRUMENT=address), which finds
// them in the tensors' memory. Floating point is the host's IEEE arithmetic
// without contraction (-ffp-contract=off): __fadd_rn and friends round
// exactly as on the GPU, while plain a * b + c, which nvcc may fuse into an
// FMA, can differ in the last bit; __expf is expf.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cmath>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// ---- fibers ---------------------------------------------------------------------------
// A fiber's saved context. On x86-64 Linux a switch saves the callee-saved
// registers and the floating-point control words on the stack and swaps
// stack pointers (swapcontext would add a system call per switch, about half
// of the model's run time); elsewhere it is ucontext.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void simt_switch_stack(void** save_sp, void* load_sp);
// Weak and hidden: every translation unit including this header defines the
// same function, and each shared library keeps its own.
__asm__(
    ".pushsection .text\n"
    ".weak simt_switch_stack\n"
    ".hidden simt_switch_stack\n"
    ".type simt_switch_stack,@function\n"
    "simt_switch_stack:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size simt_switch_stack,.-simt_switch_stack\n"
    ".popsection\n");

namespace simt {
struct Context {
  void* sp = nullptr;
};
inline void context_switch(Context* from, Context* to) { simt_switch_stack(&from->sp, to->sp); }
// A context that starts `start` (which must never return) on the stack.
inline void context_make(Context* c, void* stack, size_t bytes, void (*start)()) {
  uint64_t* sp = reinterpret_cast<uint64_t*>(static_cast<char*>(stack) + bytes);  // 16-aligned
  *--sp = 0;                                   // so that `start` begins with rsp = 8 mod 16
  *--sp = reinterpret_cast<uint64_t>(start);  // where the first switch's `ret` goes
  for (int r = 0; r < 6; ++r) *--sp = 0;      // rbp (0 ends frame-pointer walks), rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpu;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpu));
  *--sp = mxcsr | (static_cast<uint64_t>(fpu) << 32);
  c->sp = sp;
}
}  // namespace simt
#else
namespace simt {
struct Context {
  ucontext_t uc;
};
inline void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
inline void context_make(Context* c, void* stack, size_t bytes, void (*start)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = bytes;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, start, 0);
}
}  // namespace simt
#endif

// ---- the language -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a function-local static is exactly one block's
// shared variable. (tests/simt/build.py rewrites `extern __shared__` arrays.)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef struct SimtStream* cudaStream_t;

constexpr int warpSize = 32;

namespace simt {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // an H100's opt-in limit per block
constexpr int kSpinLimit = 1 << 16;                // __nanosleep calls without progress
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kEntryFrameBytes = 16 * 1024;  // top of a fiber's stack: entry()'s frame

// A programming error found while running a kernel.
struct Fault {
  std::string what;
};

enum class State { kReady, kBarrier, kWarp, kDone };
enum class Op { kSyncwarp, kShfl, kShflUp, kShflDown, kShflXor, kMatchAny, kReduceAdd, kBallot };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncwarp: return "__syncwarp";
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kMatchAny: return "__match_any_sync";
    case Op::kReduceAdd: return "__reduce_add_sync";
    case Op::kBallot: return "__ballot_sync/__any_sync/__all_sync";
  }
  return "?";
}

struct Thread {
  uint3 idx;
  unsigned lane = 0, warp = 0;
  State state = State::kReady;
  Context context;
  void* stack = nullptr;
  // The warp collective this thread waits in, and what it brought.
  Op op = Op::kSyncwarp;
  unsigned mask = 0;
  int width = 32;
  uint64_t value = 0;
  uint64_t gathered[32];  // every participating lane's value, filled on release
  int spins = 0;
};

struct Block {
  uint3 idx;
  dim3 dim, grid;
  std::vector<Thread> threads;
  size_t at_barrier = 0, done = 0;
  unsigned char* dynamic_shared = nullptr;
  size_t dynamic_shared_bytes = 0;
  std::vector<const void*> fresh_shared;  // static __shared__ variables poisoned in this block
  bool reverse_order = false;
  const std::function<void()>* body = nullptr;
  Context scheduler;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer's fiber switches
  size_t scheduler_stack_bytes = 0;
  bool failed = false;
  std::string error;
};

inline thread_local Block* block = nullptr;
inline thread_local Thread* self = nullptr;
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local std::string last_message;  // describes last_message_error
inline thread_local cudaError_t last_message_error = cudaSuccess;
inline thread_local uint64_t launches = 0;
inline thread_local std::vector<void*> stack_pool;
inline thread_local std::unordered_map<const void*, size_t> max_dynamic_shared;

inline std::string where(const Thread& t) {
  std::ostringstream s;
  s << "block (" << block->idx.x << "," << block->idx.y << "," << block->idx.z << ") thread ("
    << t.idx.x << "," << t.idx.y << "," << t.idx.z << ") [warp " << t.warp << " lane " << t.lane
    << "]";
  return s.str();
}

[[noreturn]] inline void fault(const std::string& what) { throw Fault{where(*self) + ": " + what}; }

// Switches between a fiber and the scheduler. Under AddressSanitizer
// (TALLYTRAIN_SIMT_INSTRUMENT=address) each switch is announced, so that it follows the
// stacks; an exiting fiber's fake stack is dropped.
inline void switch_to(Context* from, Context* to, const void* to_stack, size_t to_bytes,
                      bool exiting = false) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, to_stack, to_bytes);
  context_switch(from, to);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)to_stack, (void)to_bytes, (void)exiting;
  context_switch(from, to);
#endif
}

inline void yield() {
  switch_to(&self->context, &block->scheduler, block->scheduler_stack,
            block->scheduler_stack_bytes);
}

inline void entry() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &block->scheduler_stack, &block->scheduler_stack_bytes);
#endif
  Thread* t = self;
  try {
    (*block->body)();
  } catch (const Fault& f) {
    block->failed = true;
    block->error = f.what;
  } catch (const std::exception& e) {
    block->failed = true;
    block->error = where(*t) + ": exception: " + e.what();
  }
  t->state = State::kDone;
  ++block->done;
  switch_to(&t->context, &block->scheduler, block->scheduler_stack, block->scheduler_stack_bytes,
            true);  // never resumed
}

// ---- warp collectives ------------------------------------------------------------------
inline Thread* warp_lanes(const Thread& t) { return &block->threads[t.warp * 32]; }
inline unsigned warp_width(const Thread& t) {
  const size_t n = block->threads.size() - t.warp * 32;
  return n < 32 ? static_cast<unsigned>(n) : 32u;
}

// Releases the collective `t` waits in if every lane of its mask has arrived.
inline void try_release(Thread& t) {
  Thread* lanes = warp_lanes(t);
  const unsigned width = warp_width(t);
  for (unsigned l = 0; l < 32; ++l) {
    if (!((t.mask >> l) & 1u)) continue;
    if (l >= width) fault("warp collective mask names lane " + std::to_string(l) +
                          ", beyond the block's last thread");
    const Thread& o = lanes[l];
    if (o.state == State::kDone)
      fault(std::string(op_name(t.op)) + " with mask 0x" + [&] {
        std::ostringstream s;
        s << std::hex << t.mask;
        return s.str();
      }() + " waits for lane " + std::to_string(l) + ", which has exited");
    // A lane in another collective (or the same one with another mask, as
    // when match_any groups reduce separately) has not arrived yet; lanes
    // that never agree end in the scheduler's deadlock report.
    if (o.state != State::kWarp || o.mask != t.mask || o.op != t.op || o.width != t.width) return;
  }
  uint64_t values[32];
  for (unsigned l = 0; l < 32; ++l)
    if ((t.mask >> l) & 1u) values[l] = lanes[l].value;
  for (unsigned l = 0; l < 32; ++l) {
    if (!((t.mask >> l) & 1u)) continue;
    std::memcpy(lanes[l].gathered, values, sizeof(values));
    lanes[l].state = State::kReady;
  }
}

// Joins a warp collective; returns every lane's value (valid for the lanes
// of `mask`) once all of them have joined.
inline const uint64_t* collective(Op op, unsigned mask, uint64_t value, int width = 32) {
  Thread& t = *self;
  if (!((mask >> t.lane) & 1u)) {
    std::ostringstream s;
    s << op_name(op) << " called with mask 0x" << std::hex << mask
      << ", which leaves out the caller";
    fault(s.str());
  }
  t.op = op;
  t.mask = mask;
  t.width = width;
  t.value = value;
  t.state = State::kWarp;
  t.spins = 0;
  try_release(t);
  if (t.state == State::kWarp) yield();
  return t.gathered;
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <class T>
T shuffle_from(Op op, unsigned mask, T v, unsigned src, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    fault("shuffle width " + std::to_string(width) + " is not a power of two in 1..32");
  const uint64_t* all = collective(op, mask, to_bits(v), width);
  if (src == self->lane) return v;
  if (!((mask >> src) & 1u))
    fault("shuffle reads lane " + std::to_string(src) + ", which is not in the mask");
  return from_bits<T>(all[src]);
}

// ---- launching ---------------------------------------------------------------------------
struct Config {
  dim3 grid, block;
  size_t shared;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shared(s) {}
};

inline void fail_launch(cudaError_t err, const std::string& message) {
  last_error = err;
  last_message = message;
  last_message_error = err;
}

// Fiber stacks: kStackBytes above an inaccessible guard page, so that an
// overflow faults instead of corrupting the neighbouring stack.
constexpr size_t kGuardBytes = 4096;

inline void* take_stack() {
  if (!stack_pool.empty()) {
    void* s = stack_pool.back();
    stack_pool.pop_back();
    return s;
  }
  void* base = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED || mprotect(base, kGuardBytes, PROT_NONE) != 0) throw std::bad_alloc();
  return static_cast<char*>(base) + kGuardBytes;
}

inline void drop_stack(void* stack) {
  munmap(static_cast<char*>(stack) - kGuardBytes, kGuardBytes + kStackBytes);
}

// Runs one block to completion (or to its first fault).
inline void run_block(Block& b) {
  const size_t n = b.threads.size();
  for (size_t i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    const unsigned lin = static_cast<unsigned>(i);
    t.idx = uint3{lin % b.dim.x, (lin / b.dim.x) % b.dim.y, lin / (b.dim.x * b.dim.y)};
    t.lane = lin % 32;
    t.warp = lin / 32;
    t.state = State::kReady;
    t.spins = 0;
    if (!t.stack) t.stack = take_stack();
#if defined(__SANITIZE_ADDRESS__)
    // A reused stack keeps the poisoned redzones of entry()'s frame, the one
    // frame that never returns; the frames below unpoison theirs on return.
    __asan_unpoison_memory_region(static_cast<char*>(t.stack) + kStackBytes - kEntryFrameBytes,
                                  kEntryFrameBytes);
#endif
    context_make(&t.context, t.stack, kStackBytes, entry);
  }
  b.at_barrier = b.done = 0;
  // Shared memory holds garbage at the start of every block.
  std::memset(b.dynamic_shared, 0xCD, b.dynamic_shared_bytes);
  b.fresh_shared.clear();
  while (b.done < n) {
    bool ran = false;
    for (size_t k = 0; k < n && !b.failed; ++k) {
      Thread& t = b.threads[b.reverse_order ? n - 1 - k : k];
      if (t.state != State::kReady) continue;
      self = &t;
      switch_to(&b.scheduler, &t.context, t.stack, kStackBytes);
      ran = true;
    }
    if (b.failed) return;
    if (b.at_barrier > 0 && b.at_barrier + b.done == n) {
      if (b.done > 0) {
        std::ostringstream s;
        s << "__syncthreads in block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z
          << ") reached by " << b.at_barrier << " threads after " << b.done
          << " exited (a barrier in code the block does not run uniformly)";
        b.failed = true;
        b.error = s.str();
        return;
      }
      for (Thread& t : b.threads)
        if (t.state == State::kBarrier) t.state = State::kReady;
      b.at_barrier = 0;
      continue;
    }
    if (!ran && b.done < n) {
      // Runs of consecutive threads waiting in the same place, the first few.
      auto waits_in = [&](const Thread& t) {
        if (t.state == State::kBarrier) return std::string("__syncthreads");
        std::ostringstream w;
        w << op_name(t.op) << " with mask 0x" << std::hex << t.mask << std::dec;
        for (unsigned l = 0; l < warp_width(t); ++l)
          if (((t.mask >> l) & 1u) && warp_lanes(t)[l].state == State::kDone) {
            w << " (lane " << l << " of the mask has exited)";
            break;
          }
        return w.str();
      };
      std::ostringstream s;
      s << "deadlock in block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << "): ";
      size_t runs = 0;
      for (size_t i = 0; i < n && runs < 6;) {
        if (b.threads[i].state == State::kDone) {
          ++i;
          continue;
        }
        const std::string where = waits_in(b.threads[i]);
        size_t j = i + 1;
        while (j < n && b.threads[j].state != State::kDone && waits_in(b.threads[j]) == where) ++j;
        s << (runs++ ? "; " : "") << "threads " << i << "-" << j - 1 << " wait in " << where;
        i = j;
      }
      s << " (" << b.done << " of " << n << " threads exited)";
      b.failed = true;
      b.error = s.str();
      return;
    }
  }
}

inline void run_grid(const Config& c, const void* kernel, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  const size_t shared_limit = [&] {
    auto it = max_dynamic_shared.find(kernel);
    return it == max_dynamic_shared.end() ? kDefaultDynamicShared : it->second;
  }();
  std::ostringstream bad;
  if (threads == 0 || threads > kMaxThreadsPerBlock || c.block.z > 64)
    bad << "block of " << c.block.x << "x" << c.block.y << "x" << c.block.z << " threads";
  else if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 0x7fffffffu ||
           c.grid.y > 65535 || c.grid.z > 65535)
    bad << "grid of " << c.grid.x << "x" << c.grid.y << "x" << c.grid.z << " blocks";
  else if (c.shared > shared_limit)
    bad << c.shared << " bytes of dynamic shared memory, over the kernel's limit of "
        << shared_limit << " (cudaFuncSetAttribute raises it up to " << kMaxDynamicShared << ")";
  if (!bad.str().empty())
    return fail_launch(cudaErrorInvalidConfiguration, "launch with " + bad.str());

  Block b;
  b.dim = c.block;
  b.grid = c.grid;
  b.body = &body;
  b.threads.resize(threads);
  std::vector<unsigned char> shared(c.shared + 16);
  b.dynamic_shared = shared.data() + ((16 - reinterpret_cast<uintptr_t>(shared.data()) % 16) % 16);
  b.dynamic_shared_bytes = c.shared;
  const uint64_t launch = launches++;
  Block* const saved_block = block;
  Thread* const saved_self = self;
  block = &b;
  for (unsigned z = 0; z < c.grid.z && !b.failed; ++z)
    for (unsigned y = 0; y < c.grid.y && !b.failed; ++y)
      for (unsigned x = 0; x < c.grid.x && !b.failed; ++x) {
        b.idx = uint3{x, y, z};
        // Threads start in index order in even blocks, in reverse in odd
        // ones (alternating per launch), so that a kernel that works only
        // for one order shows it.
        b.reverse_order = ((launch + x + y + z) & 1) != 0;
        run_block(b);
      }
  block = saved_block;
  self = saved_self;
  // A failed block's fibers are abandoned mid-kernel (kernels own no heap
  // memory, so nothing leaks but their stacks, which are unmapped).
  for (Thread& t : b.threads) {
    if (!t.stack) continue;
    if (b.failed) {
#if defined(__SANITIZE_ADDRESS__)
      __asan_unpoison_memory_region(t.stack, kStackBytes);  // frames that never returned
#endif
      drop_stack(t.stack);
    }
    else
      stack_pool.push_back(t.stack);
  }
  if (b.failed) fail_launch(cudaErrorLaunchFailure, "kernel fault: " + b.error);
}

template <class... P>
struct Launch {
  void (*kernel)(P...);
  Config config;
  template <class... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
    auto k = kernel;
    const std::function<void()> body = [&params, k] { std::apply(k, params); };
    run_grid(config, reinterpret_cast<const void*>(kernel), body);
  }
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), Config config) {
  return Launch<P...>{kernel, config};
}

inline unsigned char* dynamic_shared() { return block->dynamic_shared; }

// Called (by build.py's rewrite) after every static __shared__ declaration:
// the first thread of each block to get there fills the variable with 0xCD,
// as dynamic shared memory is, before any thread can write it.
inline void fresh_shared(const void* p, size_t bytes) {
  for (const void* q : block->fresh_shared)
    if (q == p) return;
  std::memset(const_cast<void*>(p), 0xCD, bytes);
  block->fresh_shared.push_back(p);
}

// Called (by build.py's rewrite) at the start of every kernel declared with
// __launch_bounds__(max_threads): a GPU refuses a larger block.
inline void launch_bounds(unsigned max_threads) {
  const unsigned threads = block->dim.x * block->dim.y * block->dim.z;
  if (threads > max_threads)
    fault("launched with " + std::to_string(threads) + " threads per block, over its "
          "__launch_bounds__(" + std::to_string(max_threads) + ")");
}

}  // namespace simt

// ---- built-in variables ---------------------------------------------------------------
#define threadIdx (::simt::self->idx)
#define blockIdx (::simt::block->idx)
#define blockDim (::simt::block->dim)
#define gridDim (::simt::block->grid)

// ---- synchronisation and warp intrinsics ------------------------------------------------
inline void __syncthreads() {
  ::simt::self->state = ::simt::State::kBarrier;
  ++::simt::block->at_barrier;
  ::simt::yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::collective(::simt::Op::kSyncwarp, mask, 0);
}
inline void __nanosleep(unsigned) {
  if (++::simt::self->spins > ::simt::kSpinLimit)
    ::simt::fault("spin-wait with __nanosleep never satisfied (it waits on work no thread does)");
  ::simt::yield();  // stays ready: the other threads of the block run first
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const unsigned base = ::simt::self->lane & ~unsigned(width - 1);
  return ::simt::shuffle_from(::simt::Op::kShfl, mask, v,
                              base + (unsigned(src) & unsigned(width - 1)), width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = ::simt::self->lane;
  unsigned src = lane ^ unsigned(lane_mask);
  if (src >= (lane / width + 1) * width) src = lane;  // later groups: one's own value
  return ::simt::shuffle_from(::simt::Op::kShflXor, mask, v, src, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = ::simt::self->lane;
  const unsigned base = lane & ~unsigned(width - 1);
  return ::simt::shuffle_from(::simt::Op::kShflUp, mask, v,
                              lane >= base + delta ? lane - delta : lane, width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = ::simt::self->lane;
  const unsigned end = (lane / width + 1) * width;
  return ::simt::shuffle_from(::simt::Op::kShflDown, mask, v,
                              lane + delta < end ? lane + delta : lane, width);
}
template <class T>
unsigned __match_any_sync(unsigned mask, T v) {
  const uint64_t mine = ::simt::to_bits(v);
  const uint64_t* all = ::simt::collective(::simt::Op::kMatchAny, mask, mine);
  unsigned same = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l] == mine) same |= 1u << l;
  return same;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  const uint64_t* all = ::simt::collective(::simt::Op::kReduceAdd, mask, v);
  unsigned sum = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) sum += static_cast<unsigned>(all[l]);
  return sum;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* all = ::simt::collective(::simt::Op::kBallot, mask, predicate != 0);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l]) bits |= 1u << l;
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == mask;
}

// ---- atomics: one fiber runs at a time, so a read-modify-write is atomic -----------------
namespace simt {
// Integer sums wrap as on the device (in the unsigned type: no C++ overflow).
template <class T>
T wrapping_add(T a, T b) {
  if constexpr (std::is_integral<T>::value) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}
}  // namespace simt
template <class T, class U>
T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = ::simt::wrapping_add(old, static_cast<T>(v));
  return old;
}
template <class T, class U>
T atomicMin(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) < old) *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicMax(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) > old) *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicOr(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old | static_cast<T>(v));
  return old;
}
template <class T, class U, class V>
T atomicCAS(T* p, U compare, V value) {
  const T old = *p;
  if (old == static_cast<T>(compare)) *p = static_cast<T>(value);
  return old;
}
template <class T, class U>
T atomicExch(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(v);
  return old;
}

// ---- arithmetic and bit intrinsics ---------------------------------------------------------
template <class To, class From>
inline To simt_bit_cast(From f) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}
inline unsigned __float_as_uint(float f) { return simt_bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return simt_bit_cast<float>(u); }
inline int __float_as_int(float f) { return simt_bit_cast<int>(f); }
inline float __int_as_float(int i) { return simt_bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return simt_bit_cast<long long>(d); }
inline double __longlong_as_double(long long i) { return simt_bit_cast<double>(i); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __expf(float x) { return std::exp(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T __ldcs(const T* p) { return *p; }

// CUDA's device-side min and max accept mixed integer types.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
