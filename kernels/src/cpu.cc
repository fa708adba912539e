// Which path the kernels take on this CPU, decided once per process.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace slimllm {

static bool detect_avx512() {
  const char* forced = std::getenv("SLIMLLM_KERNELS_ISA");
  if (forced != nullptr && std::strcmp(forced, "portable") == 0) return false;
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
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
#else
  return false;
#endif
}

}  // namespace slimllm

// For Python (ctypes): the instruction set the kernels dispatch to.
extern "C" __attribute__((visibility("default"))) const char* slimllm_kernels_isa() {
  if (!slimllm::has_avx512()) return "portable";
  return slimllm::has_avx512_vnni() ? "avx512-vnni" : "avx512";
}
