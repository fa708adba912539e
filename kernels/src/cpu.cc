// Which path the kernels take on this CPU, decided once per process.
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

}  // namespace slimllm

// For Python (ctypes): the instruction set the kernels dispatch to.
extern "C" __attribute__((visibility("default"))) const char* slimllm_kernels_isa() {
  if (!slimllm::has_avx512()) return "portable";
  if (slimllm::has_amx()) return "avx512-amx";
  if (slimllm::has_avx512_bf16()) return "avx512-bf16";
  return slimllm::has_avx512_vnni() ? "avx512-vnni" : "avx512";
}
