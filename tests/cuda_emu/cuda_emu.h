// Host emulator of the CUDA execution model, for tests: csrc/cuda/*.cu compiled by g++ (with AddressSanitizer and
// UndefinedBehaviorSanitizer) runs each thread block's threads as cooperative fibers on the CPU.
//
// - A block's threads run one at a time, each until its next __syncthreads() or its exit; the order in which the
//   runnable threads are resumed between two barriers is the schedule (in order, reversed, or a seeded shuffle drawn
//   afresh for every phase of every block). A result that depends on the schedule reveals a race.
// - Barrier divergence (a thread exits while others wait at a barrier) is reported and aborts the process.
// - __shared__ arrays (turned into emu::shared<T>() references when the source is prepared for this build) are heap
//   allocations of exactly their size per block, filled with 0xFF bytes (NaN for floating point) so a read before
//   any write shows; the sanitizers guard them as every other buffer.
// - Launch configurations are checked as the CUDA runtime does (block ≤ 1024 threads, grid.y/z ≤ 65535, ≥ 1 block,
//   static shared memory ≤ 48 KiB); a violation is the launch's cudaGetLastError().
// - emu::config().sample > 0 runs only a sample of a large grid's blocks: the first, the last, the last along x and
//   along y, and seeded random ones, `sample` in all; every launch is recorded (name, grid, block, blocks run).
// - FASTRESNET_EMU_LOG=FILE appends each launched kernel's name to FILE, one line per launch.
// Warp-level intrinsics (__shfl_*_sync, __syncwarp) are not provided: a kernel that uses them does not compile here.
#pragma once

#include <cuda_bf16.h>  // CUDA's own half / bfloat16 types and conversions compile for the host
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t, dim3 (declarations only: nothing links libcudart)
#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ __shared__is_rewritten_by_the_emulator_build__

#define threadIdx (::emu::current_thread().idx)
#define blockIdx (::emu::current_block().idx)
#define blockDim (::emu::current_block().dim)
#define gridDim (::emu::current_block().grid)
#define __syncthreads() ::emu::syncthreads()
#define FASTRESNET_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::Launch<decltype(&__VA_ARGS__)>(#__VA_ARGS__, &__VA_ARGS__, grid, block, smem, stream)

// The CUDA math functions the kernels call, with the host's IEEE arithmetic (the build uses -ffp-contract=off, so
// an intrinsic's single rounding is each operation's own).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float rsqrt(float v) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(v))); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

namespace emu {

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "CUDA EMULATOR ERROR: %s\n", msg.c_str());
  std::fflush(stderr);
  std::exit(3);
}

enum class Schedule { kInOrder, kReversed, kShuffled };

struct Config {
  Schedule schedule = Schedule::kInOrder;
  uint64_t seed = 0;
  int64_t sample = 0;  // 0: every block; else at most this many blocks per launch
};

struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  std::vector<uint3> blocks;  // the blocks that ran, in order
};

struct Thread {
  uint3 idx;
  ucontext_t ctx;
  char* stack;
  void* fake_stack;
  enum State { kRunnable, kAtBarrier, kDone } state;
  int64_t barriers;
  size_t shared_seq;
};

struct Block {
  dim3 grid, dim;
  uint3 idx;
  std::vector<void*> shared;
  std::vector<size_t> shared_size;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct State {
  Config config;
  std::vector<LaunchRecord> launches;
  cudaError_t last_error = cudaSuccess;
  Block block;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  char* stacks = nullptr;
  size_t stack_count = 0;
};

inline State& state() {
  static State s;
  return s;
}
inline Config& config() { return state().config; }
inline std::vector<LaunchRecord>& launches() { return state().launches; }
inline Thread& current_thread() {
  if (state().current == nullptr) fail("threadIdx or __syncthreads() outside a kernel");
  return *state().current;
}
inline Block& current_block() { return state().block; }

inline std::string describe(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

// ---- fibers ------------------------------------------------------------------------------------------------------
// Switches from the running fiber to the scheduler; `dying` for a fiber that never resumes (its fake stack is freed).
inline void yield_to_scheduler(bool dying) {
  State& s = state();
  Thread* t = s.current;
  __sanitizer_start_switch_fiber(dying ? nullptr : &t->fake_stack, s.scheduler_stack, s.scheduler_stack_size);
  swapcontext(&t->ctx, &s.scheduler);
  __sanitizer_finish_switch_fiber(t->fake_stack, &s.scheduler_stack, &s.scheduler_stack_size);
}

inline void fiber_entry() {
  State& s = state();
  __sanitizer_finish_switch_fiber(nullptr, &s.scheduler_stack, &s.scheduler_stack_size);
  s.body(s.body_arg);
  s.current->state = Thread::kDone;
  yield_to_scheduler(true);
}

inline void resume(Thread& t) {
  State& s = state();
  s.current = &t;
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStackBytes);
  swapcontext(&s.scheduler, &t.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
  s.current = nullptr;
}

// Stacks of `count` fibers, each below a PROT_NONE guard page (an overflow faults instead of corrupting a neighbour).
inline void ensure_stacks(size_t count) {
  State& s = state();
  if (count <= s.stack_count) return;
  if (s.stacks != nullptr) munmap(s.stacks, s.stack_count * (kStackBytes + kGuardBytes));
  const size_t bytes = count * (kStackBytes + kGuardBytes);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map fiber stacks");
  s.stacks = static_cast<char*>(p);
  s.stack_count = count;
  for (size_t i = 0; i < count; ++i) mprotect(s.stacks + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
}

inline void syncthreads() {
  Thread& t = current_thread();
  t.state = Thread::kAtBarrier;
  yield_to_scheduler(false);
}

// Runs one block: every phase resumes the runnable threads in the schedule's order; a phase ends when each has
// reached a barrier or exited.
inline void run_block(const dim3& grid, const dim3& dim, const uint3& idx, void (*body)(void*), void* arg,
                      uint64_t block_seed) {
  State& s = state();
  s.block.grid = grid;
  s.block.dim = dim;
  s.block.idx = idx;
  s.body = body;
  s.body_arg = arg;
  const size_t n = static_cast<size_t>(dim.x) * dim.y * dim.z;
  ensure_stacks(n);
  s.threads.assign(n, Thread{});
  for (size_t i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.idx = uint3{static_cast<unsigned>(i % dim.x), static_cast<unsigned>(i / dim.x % dim.y),
                  static_cast<unsigned>(i / (static_cast<size_t>(dim.x) * dim.y))};
    t.stack = s.stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_entry, 0);
    t.state = Thread::kRunnable;
  }
  std::vector<size_t> order(n);
  std::mt19937_64 rng(block_seed);
  for (int64_t phase = 0;; ++phase) {
    order.clear();
    for (size_t i = 0; i < n; ++i)
      if (s.threads[i].state == Thread::kRunnable) order.push_back(i);
    if (order.empty()) break;
    if (s.config.schedule == Schedule::kReversed) std::reverse(order.begin(), order.end());
    if (s.config.schedule == Schedule::kShuffled) std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order) resume(s.threads[i]);
    size_t waiting = 0, done = 0;
    for (const Thread& t : s.threads) (t.state == Thread::kAtBarrier ? waiting : done) += 1;
    if (waiting > 0 && done > 0) {
      const auto exited = std::find_if(s.threads.begin(), s.threads.end(),
                                       [](const Thread& t) { return t.state == Thread::kDone; });
      fail("barrier divergence in block " + describe(idx) + ": thread " + describe(exited->idx) + " exited while " +
           std::to_string(waiting) + " threads wait at barrier " + std::to_string(phase + 1));
    }
    for (Thread& t : s.threads)
      if (t.state == Thread::kAtBarrier) t.state = Thread::kRunnable;
  }
  for (void* p : s.block.shared) std::free(p);
  s.block.shared.clear();
  s.block.shared_size.clear();
}

// The k-th __shared__ array a thread declares is the block's k-th allocation (made by the first thread to get there).
template <typename T>
T& shared() {
  Thread& t = current_thread();
  Block& b = current_block();
  const size_t k = t.shared_seq++;
  if (k == b.shared.size()) {
    size_t total = sizeof(T);
    for (size_t sz : b.shared_size) total += sz;
    if (total > kMaxSharedBytes) fail("static shared memory of " + std::to_string(total) + " bytes > 48 KiB");
    void* p = std::malloc(sizeof(T));
    std::memset(p, 0xFF, sizeof(T));
    b.shared.push_back(p);
    b.shared_size.push_back(sizeof(T));
  } else if (k > b.shared.size() || b.shared_size[k] != sizeof(T)) {
    fail("threads of block " + describe(b.idx) + " declare different __shared__ arrays");
  }
  return *static_cast<T*>(b.shared[k]);
}

// ---- launches ----------------------------------------------------------------------------------------------------
inline void log_launch(const char* name) {
  const char* path = std::getenv("FASTRESNET_EMU_LOG");
  if (path == nullptr || *path == '\0') return;
  FILE* f = std::fopen(path, "a");
  if (f == nullptr) fail(std::string("cannot open FASTRESNET_EMU_LOG file ") + path);
  std::fprintf(f, "%s\n", name);
  std::fclose(f);
}

// The kernel's name without template arguments.
inline std::string kernel_name(const char* spelled) {
  std::string s(spelled);
  return s.substr(0, s.find('<'));
}

// The blocks (linear indices) a launch runs: all, or a sample with the first, the last, the last along x (y = 0),
// the last along y (x = 0) and seeded random ones.
inline std::vector<uint64_t> blocks_to_run(const dim3& grid, uint64_t seed) {
  const uint64_t total = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const int64_t sample = state().config.sample;
  std::vector<uint64_t> out;
  if (sample <= 0 || total <= static_cast<uint64_t>(sample)) {
    out.resize(total);
    std::iota(out.begin(), out.end(), 0);
    return out;
  }
  out = {0, total - 1, grid.x - 1ull, static_cast<uint64_t>(grid.y - 1) * grid.x};
  std::mt19937_64 rng(seed);
  for (;;) {
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    if (static_cast<int64_t>(out.size()) >= sample) break;
    out.push_back(rng() % total);
  }
  return out;
}

inline bool valid_config(const dim3& grid, const dim3& block) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 && grid.x >= 1 &&
         grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535;
}

// FASTRESNET_LAUNCH(grid, block, smem, stream, kernel)(args...): the kernel's parameters are copied once from the
// arguments (as a launch does) and every thread calls the kernel with them.
template <typename K>
struct Launch;

template <typename... P>
struct Launch<void (*)(P...)> {
  const char* spelled;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  Launch(const char* name, void (*k)(P...), dim3 g, dim3 b, size_t dynamic_smem, cudaStream_t)
      : spelled(name), kernel(k), grid(g), block(b), smem(dynamic_smem) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    State& s = state();
    const std::string name = kernel_name(spelled);
    log_launch(name.c_str());
    if (!valid_config(grid, block) || smem != 0) {
      s.last_error = cudaErrorInvalidConfiguration;
      return;
    }
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(args))...)};
    auto body = [](void* p) {
      Call* c = static_cast<Call*>(p);
      std::apply(c->kernel, c->params);
    };
    LaunchRecord rec{name, grid, block, {}};
    // the same sample of blocks in every run of a launch (whatever the schedule)
    const uint64_t launch_seed = s.config.seed * 1000003u + std::hash<std::string>()(name) + grid.x + 65536ull * grid.y;
    for (uint64_t lin : blocks_to_run(grid, launch_seed)) {
      const uint3 idx{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>(lin / grid.x % grid.y),
                      static_cast<unsigned>(lin / (static_cast<uint64_t>(grid.x) * grid.y))};
      rec.blocks.push_back(idx);
      run_block(grid, block, idx, body, &call, launch_seed * 7919u + lin);
    }
    s.launches.push_back(std::move(rec));
  }
};

}  // namespace emu

// The runtime functions the launchers call (declared by cuda_runtime_api.h; defined here, not in libcudart).
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::emu::state().last_error;
  ::emu::state().last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}
