// Which path the kernels take on this CPU, decided once per process.
#include <chrono>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace slimllm {

// The tiers (kernels.h), in order; SLIMLLM_KERNELS_ISA names the highest one allowed.
enum Tier { kPortable, kAvx512, kVnni, kBf16, kAmx };
static const char* const kTierNames[] = {"portable", "avx512", "avx512-vnni", "avx512-bf16",
                                         "avx512-amx"};

static int tier_cap() {
  static const int cap = [] {
    const char* forced = std::getenv("SLIMLLM_KERNELS_ISA");
    for (int t = kPortable; forced != nullptr && t <= kAmx; ++t)
      if (std::strcmp(forced, kTierNames[t]) == 0) return t;
    return int(kAmx);  // unset (an unknown name is refused in Python: kernels.isa())
  }();
  return cap;
}

static bool detect_avx512() {
  if (tier_cap() < kAvx512) return false;
#if SLIMLLM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
  static const bool yes = detect_avx512();
  return yes;
}

bool has_avx512_vnni() {
#if SLIMLLM_X86
  static const bool yes =
      has_avx512() && tier_cap() >= kVnni && __builtin_cpu_supports("avx512vnni");
  return yes;
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#if SLIMLLM_X86
  static const bool yes =
      has_avx512_vnni() && tier_cap() >= kBf16 && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

static bool detect_amx() {
  if (tier_cap() < kAmx) return false;
#if SLIMLLM_X86 && defined(__linux__)
  if (!has_avx512_bf16()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  bool tiles = (d >> 24) & 1, bf16_tiles = (d >> 22) & 1;
  if (!tiles || !bf16_tiles) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool has_amx() {
  static const bool yes = detect_amx();
  return yes;
}

Board& board() {
  static Board* const one = new Board;  // never destroyed: pool threads may outlive exit's
  return *one;
}

constexpr int64_t kLingerMaxUs = 1000000;  // a second: longer only burns a core
constexpr int64_t kLingerDefaultUs = 200;

static std::atomic<int64_t> linger_setting{[] {
  const char* us = std::getenv("SLIMLLM_KERNELS_LINGER_US");
  char* end = nullptr;
  long long value = us ? std::strtoll(us, &end, 10) : -1;  // a bad value is refused in Python
  if (!us || *us == '\0' || *end != '\0' || value < 0) value = kLingerDefaultUs;
  return std::min<int64_t>(value, kLingerMaxUs) * 1000;
}()};

int64_t linger_ns() { return linger_setting.load(std::memory_order_relaxed); }

void linger() {
  using Clock = std::chrono::steady_clock;
  Board& b = board();
  if (linger_ns() == 0) return;
  b.watching.fetch_add(1);
  uint64_t seen = b.posted.load();
  auto take = [&]() {  // the latest job, if one was posted since `seen`
    std::lock_guard<std::mutex> hold(b.lock);
    seen = b.posted.load();
    b.taken.fetch_add(1, std::memory_order_relaxed);
    return b.job;
  };
  auto since = Clock::now();  // the last job's end (the window follows the setting as it is now)
  for (int spins = 1;; ++spins) {
    if (b.posted.load() != seen) {
      std::shared_ptr<Job> job = take();
      if (!(job && job->run())) break;  // a call that does not linger: back to the pool
      since = Clock::now();
    }
#if SLIMLLM_X86
    __builtin_ia32_pause();
#endif
    if (spins % 256 == 0) {
      if (Clock::now() - since > std::chrono::nanoseconds(linger_ns())) break;
      std::this_thread::yield();  // a core other threads wait for is theirs
    }
  }
  // A call that read `watching` before this helper left scheduled no task for it: take its
  // job on the way out (posting and `watching` are sequentially consistent, so that call's post
  // is seen here, or it saw this helper gone and scheduled one).
  b.watching.fetch_sub(1);
  if (b.posted.load() != seen) {
    std::shared_ptr<Job> job = take();
    if (job) job->run();
  }
}

}  // namespace slimllm

// For Python (ctypes): how long helpers linger after decode-sized calls, in microseconds (at
// most a second; `kernels.set_linger_us`); returns the previous value.
extern "C" __attribute__((visibility("default"))) int64_t slimllm_set_linger_us(int64_t us) {
  us = std::min<int64_t>(std::max<int64_t>(us, 0), slimllm::kLingerMaxUs);
  return slimllm::linger_setting.exchange(us * 1000) / 1000;
}

// For Python (ctypes): how many jobs lingering helpers have taken from the board so far (tests).
extern "C" __attribute__((visibility("default"))) int64_t slimllm_linger_taken() {
  return int64_t(slimllm::board().taken.load());
}

// For Python (ctypes): the current linger, in microseconds (`kernels.linger_us`).
extern "C" __attribute__((visibility("default"))) int64_t slimllm_linger_us() {
  return slimllm::linger_ns() / 1000;
}

// For Python (ctypes): the instruction set the kernels dispatch to.
extern "C" __attribute__((visibility("default"))) const char* slimllm_kernels_isa() {
  if (!slimllm::has_avx512()) return "portable";
  if (slimllm::has_amx()) return "avx512-amx";
  if (slimllm::has_avx512_bf16()) return "avx512-bf16";
  return slimllm::has_avx512_vnni() ? "avx512-vnni" : "avx512";
}
