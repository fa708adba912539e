// The multiply-add peak of the instructions the batched products use, for the benchmarks'
// compute floor (bench/grid.py): a step at batch B multiplies B rows by every weight, so no
// kernel can take less than B * weights / peak, whatever memory does.
//
// Each thread runs kChains independent accumulators of one instruction (more than its latency
// times its issue rate on the CPUs the kernels target), in registers, for a given time.
#include <chrono>
#include <thread>
#include <vector>

#include "kernels.h"

#if SLIMLLM_X86
#include <immintrin.h>
#endif

namespace slimllm {
namespace {

constexpr int kChains = 16;
constexpr int64_t kRound = 4096;  // instructions of each chain between looks at the clock

enum Kind { kFma = 0, kBf16Pairs = 1, kByteQuads = 2 };
constexpr int64_t kMacsPerInstruction[] = {16, 32, 64};

using Clock = std::chrono::steady_clock;

// The accumulators between rounds (in memory: 16 vectors stored per 65536 instructions).
struct Chains {
  alignas(64) uint8_t acc[kChains][64] = {};
};

#if SLIMLLM_X86
// Each runs kRound instructions on every chain; the operand is hidden from the compiler each
// time, so that nothing is folded.
SLIMLLM_AVX512 void fma_round(Chains& c) {
  __m512 a[kChains], x = _mm512_set1_ps(1e-9f);
  for (int t = 0; t < kChains; ++t) a[t] = _mm512_load_ps(c.acc[t]);
  for (int64_t i = 0; i < kRound; ++i) {
    for (auto& v : a) v = _mm512_fmadd_ps(x, x, v);
    asm volatile("" : "+v"(x));
  }
  for (int t = 0; t < kChains; ++t) _mm512_store_ps(c.acc[t], a[t]);
}

SLIMLLM_AVX512_BF16 void pairs_round(Chains& c) {
  __m512 a[kChains];
  __m512i x = _mm512_set1_epi16(1);
  for (int t = 0; t < kChains; ++t) a[t] = _mm512_load_ps(c.acc[t]);
  for (int64_t i = 0; i < kRound; ++i) {
    for (auto& v : a) v = _mm512_dpbf16_ps(v, (__m512bh)x, (__m512bh)x);
    asm volatile("" : "+v"(x));
  }
  for (int t = 0; t < kChains; ++t) _mm512_store_ps(c.acc[t], a[t]);
}

SLIMLLM_AVX512_VNNI void quads_round(Chains& c) {
  __m512i a[kChains], x = _mm512_set1_epi8(1);
  for (int t = 0; t < kChains; ++t) a[t] = _mm512_load_si512(c.acc[t]);
  for (int64_t i = 0; i < kRound; ++i) {
    for (auto& v : a) v = _mm512_dpbusd_epi32(v, x, x);
    asm volatile("" : "+v"(x));
  }
  for (int t = 0; t < kChains; ++t) _mm512_store_si512(c.acc[t], a[t]);
}

// Instructions one thread ran in rounds for `seconds`, and the seconds they took.
std::pair<int64_t, double> timed(void (*round)(Chains&), double seconds) {
  Chains chains;
  int64_t done = 0;
  const auto t0 = Clock::now();
  double took = 0.0;
  while (took < seconds) {
    round(chains);
    done += kRound * kChains;
    took = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  return {done, took};
}
#endif

bool supported(int kind) {
  switch (kind) {
    case kFma: return has_avx512();
    case kBf16Pairs: return has_avx512_bf16();
    case kByteQuads: return has_avx512_vnni();
    default: return false;
  }
}

}  // namespace
}  // namespace slimllm

// For Python (ctypes): multiply-adds per second of instruction `kind` (0: float32 FMA, 1:
// VDPBF16PS, 2: VPDPBUSD; zmm registers) on `threads` threads at once, each for `seconds`;
// 0 when this CPU (or SLIMLLM_KERNELS_ISA) does not offer it.
extern "C" __attribute__((visibility("default"))) double slimllm_peak_macs(int kind, int threads,
                                                                         double seconds) {
  using namespace slimllm;
  if (!supported(kind) || threads < 1 || !(seconds > 0.0)) return 0.0;
#if SLIMLLM_X86
  std::vector<std::pair<int64_t, double>> out(threads);
  void (*round)(Chains&) =
      kind == kFma ? fma_round : kind == kBf16Pairs ? pairs_round : quads_round;
  auto one = [&](int t) { out[t] = timed(round, seconds); };
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t) others.emplace_back(one, t);
  one(0);
  for (auto& t : others) t.join();
  double rate = 0.0;
  for (const auto& [done, took] : out) rate += double(done) / took;
  return rate * double(kMacsPerInstruction[kind]);
#else
  return 0.0;
#endif
}
