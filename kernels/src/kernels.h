// Shared pieces of slimllm's CPU kernels: the XLA FFI headers, which instruction set this CPU
// offers, and a parallel loop on XLA's own intra-op thread pool.
//
// Every kernel has a portable path (plain C++, compiled for the baseline x86-64 or whatever the
// compiler targets) and, where it pays, an AVX-512 path compiled with a `target` attribute and
// chosen at run time by `has_avx512()`: one library serves every CPU of the architecture.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace slimllm {

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__)
#define SLIMLLM_X86 1
#define SLIMLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define SLIMLLM_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512vnni")))
#define SLIMLLM_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512vnni,avx512bf16")))
#define SLIMLLM_AMX                                                                    \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16,amx-tile," \
                        "amx-bf16")))
#else
#define SLIMLLM_X86 0
#endif

// The instruction sets the kernels dispatch to come in tiers, each holding the ones before it:
// "portable", "avx512", "avx512-vnni", "avx512-bf16", "avx512-amx". SLIMLLM_KERNELS_ISA=<tier>
// (read once per process) caps them at that tier, for tests and comparisons.
//
// The AVX-512 subset the kernels use (F, BW, VL, DQ): Skylake-SP and later, Zen 4 and later.
bool has_avx512();
// and AVX512-VNNI (Cascade Lake and later, Zen 4): integer dot products
bool has_avx512_vnni();
// and AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4): bfloat16 dot products
bool has_avx512_bf16();
// and AMX tiles with bfloat16 products (Sapphire Rapids and later), which the operating system
// let this process use (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked for once here).
bool has_amx();

// A call's items, claimable by any thread that holds the job.
struct Job {
  virtual ~Job() = default;
  // Claim and run items until none is left; true if the call asked its helpers to linger.
  virtual bool run() = 0;
};

// Where each call posts its job, for a helper that lingers after the call before it.
struct Board {
  std::mutex lock;
  std::shared_ptr<Job> job;  // the latest call's (kept alive here until the next one)
  std::atomic<uint64_t> posted{0};  // how many calls have posted
  std::atomic<int> watching{0};  // helpers lingering now
  std::atomic<uint64_t> taken{0};  // jobs lingering helpers took (for tests)
};
Board& board();

// How long a helper watches the board after the items of a call that asks it to linger
// (nanoseconds; 0: never). SLIMLLM_KERNELS_LINGER_US (read once) sets it; default 200 us.
int64_t linger_ns();

// After a lingering call's items: watch the board for linger_ns(), run each job posted there
// meanwhile (watching again after one that lingers, leaving after one that does not), then
// return to the pool. Waking a sleeping pool thread took 20-130 us on the 2-core VM here,
// longer than many decode-sized calls.
void linger();

// Run body(i) for i in [0, n) on the calling thread and up to the pool's other threads. Items
// are claimed from a shared counter, so no thread waits for a task that never started: a helper
// that starts late finds no work left. Returns when every item has finished. The call posts its
// items on the board first and schedules pool tasks only for the helpers not already watching
// it; with `stay` (decode-sized calls: the next call follows within microseconds), its helpers
// linger afterwards.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Body body, bool stay = false) {
  struct State : Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    int64_t n;
    Body* body;
    bool stay;
    State(int64_t n, Body* body, bool stay) : n(n), body(body), stay(stay) {}
    // A helper may hold the state after this call returned (the board keeps it until the next
    // call), and touches the body only when it claims an item (and then this call is still
    // waiting for that item).
    bool run() override {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        (*body)(i);
        finished.fetch_add(1, std::memory_order_release);
      }
      return stay;
    }
  };
  auto state = std::make_shared<State>(n, &body, stay);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers > 0) {
    Board& b = board();
    {
      std::lock_guard<std::mutex> hold(b.lock);
      b.job = state;
    }
    b.posted.fetch_add(1);  // sequentially consistent with `watching` (see linger())
    for (int64_t h = b.watching.load(); h < helpers; ++h)
      pool.Schedule([state] {
        if (state->run()) linger();
      });
  }
  state->run();
  // Items still running on other threads: spin briefly (they finish within microseconds on an
  // idle machine), then yield, so a helper descheduled by other load gets the core back.
  for (int spins = 0; state->finished.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096) {
#if SLIMLLM_X86
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace slimllm
