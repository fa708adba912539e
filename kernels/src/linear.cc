// y[m, n] = x[m, k] @ W[n, k]^T for a weight W in any of slimllm's formats (the reference's
// weight_format.py): float32, float16, bfloat16 (bit patterns), int8 and int4 (two codes per byte,
// low nibble first, code - 8) with one scale per row per group of columns (float32, or float16
// as int4 stores them: each read widens it, `scale_of`).
//
// The arithmetic is the reference's: each weight is widened to float32 (times its scale, the
// reference's `dequantize`) and multiplied in float32; only the order of the sums differs. It
// is memory-bound at the batch sizes of decoding, so the kernel reads each weight row once per
// call whatever m is: a tile of 4 rows is widened 16 columns at a time in registers and meets
// up to 4 rows of x per pass (all passes of a tile hit the L1 cache). Threads split the rows.
//
// With `integer` set (Runtime.kernels "fast"), int8 and int4 codes on AVX-512 take another road,
// because widening each code to float32 and scaling it costs more instructions than the memory
// it saves: x is rounded once per call to
// 16-bit integers (one scale per row of x, max|x| / 32767) and multiplied with the codes in
// integer pairs (AVX512-VNNI vpdpwssd: 32 products per instruction, summed exactly in int32), and each
// group's (or 2048 columns') integer sum is scaled in float32. The only departure from the
// float32 product is x's rounding: |error| <= max|x| / 65534 * sum |w| per output, about 1e-5
// of the result's scale, and the same for every batch size (each row of x has its own scale).
// int4 codes take the byte road instead where the columns come in blocks of 128 (section
// "int4 bytes" below): widening nibbles to 16 bits cost more than reading them.
//
// On a CPU with AMX, "fast" products of more than 4 rows of x take a third road, AMX tiles
// (section "AMX path" below): decoding a batch multiplies 16 rows of x per weight read, which
// the float32 road can only do at the FMA units' peak (~300 GFLOP/s on 2 cores here). Without
// AMX, on a CPU with AVX512-BF16 (Zen 4), they take the bfloat16 pairs road and, for int8
// codes and int4 codes in groups of 32, its int8 quads and int4 lanes; bfloat16 weights against
// prefill's rows take its columns (sections below).
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace slimllm {
namespace {

// The reference's encodings, numbered as kernels/__init__.py numbers them.
enum Encoding : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kInt4 = 4 };

constexpr bool scaled(int e) { return e == kInt8 || e == kInt4; }

struct Problem {
  const float* x;  // [m, k]
  const uint8_t* w;  // [n, row_bytes]
  const float* scale;  // [n, groups] (scaled encodings), unless half_scale holds them
  float* y;  // [m, n]
  int64_t m, n, k, row_bytes, groups, group;
  const uint16_t* half_scale = nullptr;  // [n, groups] float16 scales as stored (int4's)
  bool pairs = false;  // bfloat16 w in pair order, [n / 16, 16 k]: the columns road reads it
  const int16_t* xq = nullptr;  // [m, k] x rounded to 16 bits (the integer path)
  const float* xs = nullptr;  // [m] their scales
  const int8_t* x_even = nullptr;  // [m, k/2] x rounded to int8, even columns (int4 bytes)
  const int8_t* x_odd = nullptr;  // [m, k/2] odd columns
  const int32_t* x_bias = nullptr;  // [m, k/8] -8 * the sum of each 8 columns' int8 values
  const float* x_lanes = nullptr;  // [m, k/8] x's scale for each 8 columns (of its 32)
};

constexpr int64_t kIntBlock = 2048;  // columns summed in int32 before a float conversion

constexpr int64_t kTileRows = 4;  // weight rows per register tile
constexpr int64_t kTileX = 4;  // rows of x per pass over a tile
constexpr int64_t kChunkRows = 64;  // weight rows per parallel work item
constexpr int64_t kStayRows = 16;  // decode-sized: helpers linger after these (kernels.h)

// ---------------------------------------------------------------- portable path

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 31, mant = h & 1023, bits;
  if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while (!(mant & 1024)) mant <<= 1, ++shift;
    bits = sign | (uint32_t(113 - shift) << 23) | ((mant & 1023) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Weight row `row`'s scale of group g as float32 (int4's are stored in float16).
template <int E>
float scale_portable(const Problem& p, int64_t row, int64_t g) {
  const int64_t at = row * p.groups + g;
  if constexpr (E == kInt4) return half_to_float(p.half_scale[at]);
  return p.scale[at];
}

template <int E>
float widen_one(const uint8_t* row, int64_t j) {
  if constexpr (E == kFloat32) {
    float f;
    std::memcpy(&f, row + 4 * j, 4);
    return f;
  } else if constexpr (E == kFloat16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * j, 2);
    return half_to_float(h);
  } else if constexpr (E == kBFloat16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * j, 2);
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else if constexpr (E == kInt8) {
    return float(int8_t(row[j]));
  } else {
    uint8_t b = row[j / 2];
    return float(int((j & 1) ? b >> 4 : b & 15) - 8);
  }
}

template <int E>
void rows_portable(const Problem& p, int64_t r0, int64_t r1) {
  std::vector<float> w(p.k);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.w + r * p.row_bytes;
    for (int64_t j = 0; j < p.k; ++j) {
      w[j] = widen_one<E>(row, j);
      if constexpr (scaled(E)) w[j] *= scale_portable<E>(p, r, j / p.group);
    }
    for (int64_t i = 0; i < p.m; ++i) {
      const float* x = p.x + i * p.k;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 8 <= p.k; j += 8)
        for (int l = 0; l < 8; ++l) acc[l] += w[j + l] * x[j + l];
      for (; j < p.k; ++j) acc[0] += w[j] * x[j];
      p.y[i * p.n + r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                         ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
}

// Does this product fit the byte road: 128-column blocks whose lanes lie in single groups?
bool int4_bytes_fit(const Problem& p) {
  return p.k % 128 == 0 && p.group % 32 == 0 && (p.group % 128 == 0 || 128 % p.group == 0);
}

// x for the byte road (Problem's x_* fields), one row of x after another.
void round_x_bytes(const Problem& p, int8_t* even, int8_t* odd, int32_t* bias, float* lanes) {
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = p.x + i * p.k;
    for (int64_t j0 = 0; j0 < p.k; j0 += 32) {
      float top = 0.0f;
      for (int64_t j = j0; j < j0 + 32; ++j) top = std::max(top, std::fabs(x[j]));
      float inv = top > 0.0f ? 127.0f / top : 0.0f;
      for (int64_t j = j0; j < j0 + 32; j += 8) {
        int32_t sum = 0;
        for (int64_t c = j; c < j + 8; ++c) {  // rounded to nearest even, within +-127
          auto q = int8_t(std::clamp(std::nearbyint(x[c] * inv), -127.0f, 127.0f));
          (c % 2 ? odd : even)[(i * p.k + c) / 2] = q;
          sum += q;
        }
        bias[(i * p.k + j) / 8] = -8 * sum;
        lanes[(i * p.k + j) / 8] = top / 127.0f;
      }
    }
  }
}

// ---------------------------------------------------------------- AVX-512 path

#if SLIMLLM_X86

// Scales as float32: weight row `row`'s of group g, and `take` of them from group g on (the
// rest zero). int4 stores them in float16, as Q4_0 does (its matrices read a tenth fewer bytes
// than with float32 scales), and the roads widen each as they read it (F16C); int8's are
// float32. The width follows the encoding at compile time: a run-time test in these helpers
// (either width for any encoding) made GCC lay out the int8 quads' loop anew, 2.2x slower
// (128 rows of x, 5632 x 1024: 3.06-3.33 -> 7.04-7.75 ms). Widening a work item's scales into
// a float32 buffer before its rows was slower than float32 scales (the 156M model's int4
// matrices, min ms: one row of x 2.23 -> 2.41, four rows 5.2 -> 6.3): the item read all of
// them before its first weight row.
template <int E>
SLIMLLM_AVX512 inline float scale_of(const Problem& p, int64_t row, int64_t g) {
  const int64_t at = row * p.groups + g;
  if constexpr (E == kInt4) return _cvtsh_ss(p.half_scale[at]);
  return p.scale[at];
}

template <int E>
SLIMLLM_AVX512 inline __m128 scales_4(const Problem& p, int64_t row, int64_t g, __mmask8 take) {
  const int64_t at = row * p.groups + g;
  if constexpr (E == kInt4) return _mm_cvtph_ps(_mm_maskz_loadu_epi16(take, p.half_scale + at));
  return _mm_maskz_loadu_ps(take, p.scale + at);
}

template <int E>
SLIMLLM_AVX512 inline __m512 scales_16(const Problem& p, int64_t row, int64_t g, __mmask16 take) {
  const int64_t at = row * p.groups + g;
  if constexpr (E == kInt4)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(take, p.half_scale + at));
  return _mm512_maskz_loadu_ps(take, p.scale + at);
}

// 16 weights of one row from column j (a multiple of 16), as float32 (unscaled).
template <int E>
SLIMLLM_AVX512 inline __m512 widen16(const uint8_t* row, int64_t j) {
  if constexpr (E == kFloat32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + j);
  } else if constexpr (E == kFloat16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * j)));
  } else if constexpr (E == kBFloat16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (E == kInt8) {
    __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  } else {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j / 2));  // 8 bytes
    __m128i nibble = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
    __m128i codes = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));  // column order
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
  }
}

// When rows were read side by side (short: 2 KB of bfloat16 at 1024 columns), the hardware
// prefetcher ramped up too late for each, and asking for the same columns kAhead rows on (the
// next tiles) paid: the 150M matrices at batch 1, bfloat16 16.9 -> 11.1 ms, int8 9.9 -> 6.7,
// float32 22.3 -> 20.1. Now the rows are read one after another at one or two rows of x, and
// the tiles' four rows a quarter of the work item apart: a stream each, which the hardware
// prefetcher follows. Only the two-row stream still gains by asking (kAskAhead; a prefetch past
// the matrix's end is harmless). The 156M model's matrices and LM head, both libraries in one
// process, both orders, min / median ms:
// - one row of x, without asking: bfloat16 8.05 / 9.58 -> 7.30 / 8.39 and 8.57 / 10.01 ->
//   7.65 / 8.23, float32 15.14 / 16.87 -> 14.71 / 16.22 and 15.72 / 19.43 -> 12.16 / 17.93,
//   int8 4.30 / 5.35 -> 4.19 / 5.08;
// - two rows: bfloat16 9.43 / 10.87 asking against 10.56 / 12.47 without (and 9.97 / 11.74
//   against 11.44 / 13.14), int8 4.26 / 5.28 against 4.58 / 5.90;
// - tiles, without asking: three rows float32 15.52 / 20.25 -> 13.37 / 18.30 and 15.69 /
//   20.92 -> 13.97 / 19.68, int8 5.57 / 6.73 -> 4.79 / 6.31; four rows float32 21.60 / 24.46
//   -> 19.76 / 22.18, int8 5.78 / 7.41 -> 5.36 / 6.81, bfloat16 within 4% either way.
constexpr int64_t kAhead = 8;
template <int RB, int MX>
constexpr bool kAskAhead = RB == 1 && MX == 2;

template <int E>
SLIMLLM_AVX512 inline void prefetch_ahead(const uint8_t* row, int64_t row_bytes, int64_t j) {
  constexpr int64_t num = E == kFloat32 ? 4 : (E == kFloat16 || E == kBFloat16) ? 2 : 1;
  constexpr int64_t den = E == kInt4 ? 2 : 1;
  const char* at = reinterpret_cast<const char*>(row + kAhead * row_bytes + j * num / den);
  _mm_prefetch(at, _MM_HINT_T0);
}

// A tile of fewer than 4 sums (one row of x against one weight row: the batch-1 road) would be
// one chain of dependent multiply-adds, one instruction's latency per 16 columns: on Zen 4 that
// bounds a core below the memory's rate. Such tiles keep kChains sums per output instead, each
// taking every kChains-th step of 16 (or 32) columns, added at the end. The 156M model's layer
// (22 MB, from the L3) at one row of x: bfloat16 0.382 -> 0.331 ms, int8 0.209 -> 0.181; two
// rows: int8 0.258 -> 0.246. From memory (8 layers and the LM head) the change was within this
// machine's noise: there the memory's rate binds first.
template <int RB, int MX>
constexpr int kChains = RB * MX >= 4 ? 1 : 4 / (RB * MX);

// One step of tile_avx512: 16 columns from j into acc.
template <int E, int RB, int MX>
SLIMLLM_AVX512 inline __attribute__((always_inline)) void step_avx512(
    const Problem& p, const uint8_t* const* rows, const float* const* xs, const __m512* s,
    int64_t j, __m512 (&acc)[RB][MX]) {
  __m512 w[RB];
  for (int r = 0; r < RB; ++r) {
    if constexpr (kAskAhead<RB, MX>) prefetch_ahead<E>(rows[r], p.row_bytes, j);
    w[r] = widen16<E>(rows[r], j);
    if constexpr (scaled(E)) w[r] = _mm512_mul_ps(w[r], s[r]);
  }
  for (int i = 0; i < MX; ++i) {
    __m512 xv = _mm512_loadu_ps(xs[i] + j);
    for (int r = 0; r < RB; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], xv, acc[r][i]);
  }
}

// y[i0 : i0+MX, r0 : r0+RB] for RB weight rows and MX rows of x, one pass over k.
template <int E, int RB, int MX>
SLIMLLM_AVX512 void tile_avx512(const Problem& p, int64_t r0, int64_t i0, int64_t stride) {
  constexpr int K = kChains<RB, MX>;
  __m512 acc[K][RB][MX];
  for (int c = 0; c < K; ++c)
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < MX; ++i) acc[c][r][i] = _mm512_setzero_ps();
  const uint8_t* rows[RB];
  for (int r = 0; r < RB; ++r) rows[r] = p.w + (r0 + r * stride) * p.row_bytes;
  const float* xs[MX];
  for (int i = 0; i < MX; ++i) xs[i] = p.x + (i0 + i) * p.k;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 s[RB];
    if constexpr (scaled(E))
      for (int r = 0; r < RB; ++r) s[r] = _mm512_set1_ps(scale_of<E>(p, r0 + r * stride, g));
    int64_t j = g * p.group, end = (g + 1) * p.group;
    for (; j + 16 * K <= end; j += 16 * K)
      for (int c = 0; c < K; ++c) step_avx512<E, RB, MX>(p, rows, xs, s, j + 16 * c, acc[c]);
    for (; j < end; j += 16) step_avx512<E, RB, MX>(p, rows, xs, s, j, acc[0]);
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < MX; ++i) {
      for (int c = 1; c < K; ++c) acc[0][r][i] = _mm512_add_ps(acc[0][r][i], acc[c][r][i]);
      p.y[(i0 + i) * p.n + r0 + r * stride] = _mm512_reduce_add_ps(acc[0][r][i]);
    }
}

// 32 codes of one row from column j (a multiple of 32) as int16, in column order.
template <int E>
SLIMLLM_AVX512_VNNI inline __m512i codes32(const uint8_t* row, int64_t j) {
  if constexpr (E == kInt8) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j)));
  } else {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j / 2));  // 32 codes
    __m128i nibble = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
    __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
    return _mm512_cvtepi8_epi16(_mm256_sub_epi8(codes, _mm256_set1_epi8(8)));
  }
}

// One step of tile_int16: 32 columns from j into sum.
template <int E, int RB, int MX>
SLIMLLM_AVX512_VNNI inline __attribute__((always_inline)) void step_int16(
    const Problem& p, const uint8_t* const* rows, const int16_t* const* xs, int64_t j,
    __m512i (&sum)[RB][MX]) {
  __m512i w[RB];
  for (int r = 0; r < RB; ++r) {
    if constexpr (kAskAhead<RB, MX>) prefetch_ahead<E>(rows[r], p.row_bytes, j);
    w[r] = codes32<E>(rows[r], j);
  }
  for (int i = 0; i < MX; ++i) {
    __m512i xv = _mm512_loadu_si512(xs[i] + j);
    for (int r = 0; r < RB; ++r) sum[r][i] = _mm512_dpwssd_epi32(sum[r][i], w[r], xv);
  }
}

// The integer road (header comment) for RB weight rows and MX rows of x. The kChains sums of a
// block are int32, so adding them is exact: the result does not depend on the chains.
template <int E, int RB, int MX>
SLIMLLM_AVX512_VNNI void tile_int16(const Problem& p, int64_t r0, int64_t i0, int64_t stride) {
  constexpr int K = kChains<RB, MX>;
  bool grouped = p.groups > 1;
  int64_t block = grouped ? p.group : kIntBlock;
  __m512 acc[RB][MX];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm512_setzero_ps();
  const uint8_t* rows[RB];
  for (int r = 0; r < RB; ++r) rows[r] = p.w + (r0 + r * stride) * p.row_bytes;
  const int16_t* xs[MX];
  for (int i = 0; i < MX; ++i) xs[i] = p.xq + (i0 + i) * p.k;
  for (int64_t b0 = 0; b0 < p.k; b0 += block) {
    int64_t b1 = std::min(p.k, b0 + block);
    __m512i sum[K][RB][MX];
    for (int c = 0; c < K; ++c)
      for (int r = 0; r < RB; ++r)
        for (int i = 0; i < MX; ++i) sum[c][r][i] = _mm512_setzero_si512();
    int64_t j = b0;
    for (; j + 32 * K <= b1; j += 32 * K)
      for (int c = 0; c < K; ++c) step_int16<E, RB, MX>(p, rows, xs, j + 32 * c, sum[c]);
    for (; j < b1; j += 32) step_int16<E, RB, MX>(p, rows, xs, j, sum[0]);
    for (int r = 0; r < RB; ++r) {
      __m512 s =
          _mm512_set1_ps(grouped ? scale_of<E>(p, r0 + r * stride, b0 / p.group) : 1.0f);
      for (int i = 0; i < MX; ++i) {
        for (int c = 1; c < K; ++c) sum[0][r][i] = _mm512_add_epi32(sum[0][r][i], sum[c][r][i]);
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[0][r][i]), s, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    float row_scale = grouped ? 1.0f : scale_of<E>(p, r0 + r * stride, 0);
    for (int i = 0; i < MX; ++i)
      p.y[(i0 + i) * p.n + r0 + r * stride] =
          _mm512_reduce_add_ps(acc[r][i]) * p.xs[i0 + i] * row_scale;
  }
}

// ---------------------------------------------------------------- int4 bytes (kernels "fast")
//
// The 16-bit road spends ~10 instructions per 32 int4 codes (unpack, widen, one vpdpwssd, then
// a float flush per group of 32): the 150M preset's int4 step took 6.6 ms against llama.cpp
// Q4_0's 4.1. Here the codes stay bytes. x is rounded to int8 with one scale per 32 columns
// (max|x| / 127, as Q8_0 and the AMX road round it) and split into its even and odd columns:
// a byte of codes holds column 2t in its low nibble and 2t + 1 in its high one, so 64 bytes
// of a weight row (128 columns) meet x in two AVX512-VNNI vpdpbusd (unsigned nibble times
// signed x, 4 products summed per int32 lane) after one AND and one shift. Lane l of a block
// holds columns 8l .. 8l + 7, all in one 32-column step, so one vector of lane scales (x's
// step times the weight row's group) turns the int32 sums into float32 per block. The codes
// are stored as code + 8: each lane starts from -8 * its x sum. The four rows of a tile (a
// quarter of the work item apart) are four streams the hardware prefetcher follows: asking for
// the rows kAhead on as well was slower (the 156M model's matrices and LM head, both libraries
// in one process, both orders, min / median ms: one row of x 2.34 / 2.63 -> 2.17 / 2.38 and
// 3.05 / 3.45 -> 2.97 / 3.30; four rows 6.11 / 8.20 -> 5.66 / 6.89 and 7.42 / 8.98 -> 6.79 / 8.17).
//   |error| <= sum over 32-column steps of max|x_step| / 254 * sum_j |w_j| per output.

// y[i, r0 : r0+RB] for RB weight rows and one row i of x, one pass over k.
template <int RB>
SLIMLLM_AVX512_VNNI void tile_int4_bytes(const Problem& p, int64_t r0, int64_t i, int64_t stride) {
  const __m512i nibble = _mm512_set1_epi8(15);
  // lane l of a block takes the weight scale of its group: (8l) / group of the block's first
  const bool one_group = p.group % 128 == 0;
  const int64_t per_block = one_group ? 1 : 128 / p.group;
  alignas(64) int32_t pick_lanes[16];
  for (int l = 0; l < 16; ++l) pick_lanes[l] = one_group ? 0 : 8 * l / int32_t(p.group);
  const __m512i pick = _mm512_load_si512(pick_lanes);
  const __mmask8 first = __mmask8((1u << per_block) - 1);
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* rows = p.w + r0 * p.row_bytes;
  const int64_t row_bytes = p.row_bytes * stride;
  const int8_t* xe = p.x_even + i * p.k / 2;
  const int8_t* xo = p.x_odd + i * p.k / 2;
  const int32_t* xb = p.x_bias + i * p.k / 8;
  const float* xl = p.x_lanes + i * p.k / 8;
  // the block's first group, counted without a 64-bit division per block (`perf annotate` had
  // an idiv in this loop; removing it left one row's time within noise)
  int64_t g = 0, into_group = 0;
  for (int64_t j = 0; j < p.k; j += 128) {
    __m512i even = _mm512_loadu_si512(xe + j / 2), odd = _mm512_loadu_si512(xo + j / 2);
    __m512i start = _mm512_loadu_si512(xb + j / 8);
    __m512 x_scale = _mm512_loadu_ps(xl + j / 8);
    for (int r = 0; r < RB; ++r) {
      const uint8_t* row = rows + r * row_bytes;
      __m512i b = _mm512_loadu_si512(row + j / 2);
      __m512i lo = _mm512_and_si512(b, nibble);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
      __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo, even), hi, odd);
      __m128 group_scales = scales_4<kInt4>(p, r0 + r * stride, g, first);  // 1, 2 or 4
      __m512 w_scale = _mm512_permutexvar_ps(pick, _mm512_zextps128_ps512(group_scales));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(w_scale, x_scale), acc[r]);
    }
    if (one_group) {
      into_group += 128;
      if (into_group == p.group) ++g, into_group = 0;
    } else {
      g += per_block;
    }
  }
  for (int r = 0; r < RB; ++r) p.y[i * p.n + r0 + r * stride] = _mm512_reduce_add_ps(acc[r]);
}

template <int E, int RB>
SLIMLLM_AVX512 void tile_all_x(const Problem& p, int64_t r0, int64_t stride) {
  int64_t i = 0;
  if constexpr (E == kInt4) {
    if (p.x_even != nullptr) {  // the byte road: one row of x per pass
      for (; i < p.m; ++i) tile_int4_bytes<RB>(p, r0, i, stride);
      return;
    }
  }
  if (p.xq != nullptr) {  // the integer road: 2 rows of x per pass (registers)
    if constexpr (scaled(E)) {
      for (; i + 2 <= p.m; i += 2) tile_int16<E, RB, 2>(p, r0, i, stride);
      if (i < p.m) tile_int16<E, RB, 1>(p, r0, i, stride);
    }
    return;
  }
  for (; i + 4 <= p.m; i += 4) tile_avx512<E, RB, 4>(p, r0, i, stride);
  switch (p.m - i) {
    case 3: tile_avx512<E, RB, 3>(p, r0, i, stride); break;
    case 2: tile_avx512<E, RB, 2>(p, r0, i, stride); break;
    case 1: tile_avx512<E, RB, 1>(p, r0, i, stride); break;
    default: break;
  }
}

// At one or two rows of x the weight rows are read one after another, a single stream through
// memory, rather than kTileRows side by side: on the 2-core Zen 4 here, a read-only loop over
// 2 KB rows streamed 33.8 GB/s row after row and 21-25 GB/s four rows side by side (5.6 KB
// rows: 31-32 either way). The 156M model's matrices, 4 layers, at one row of x: bfloat16
// 3.17 -> 2.36 ms, int8 1.42 -> 1.14, float32 5.23 -> 4.84; two rows: bfloat16 3.52 -> 3.08,
// int8 1.85 -> 1.39. At four rows the tiles' reuse of x won (bfloat16 3.93 against 4.15),
// and int4's byte road, which reloads x's lanes per row, was slower alone (0.68 -> 1.04).
template <int E>
SLIMLLM_AVX512 void rows_avx512(const Problem& p, int64_t r0, int64_t r1) {
  int64_t r = r0;
  const bool stream = p.m <= 2 && !(E == kInt4 && p.x_even != nullptr);
  if (!stream && (r1 - r0) % kTileRows == 0) {  // a tile's rows a quarter of the chunk apart
    const int64_t quarter = (r1 - r0) / kTileRows;
    for (int64_t c = 0; c < quarter; ++c) tile_all_x<E, kTileRows>(p, r0 + c, quarter);
    return;
  }
  if (!stream)
    for (; r + kTileRows <= r1; r += kTileRows) tile_all_x<E, kTileRows>(p, r, 1);
  for (; r < r1; ++r) tile_all_x<E, 1>(p, r, 1);
}

// ---------------------------------------------------------------- AMX path (kernels "fast")

// With `integer` set on a CPU with AMX (`has_amx()`) and more than kTileX rows of x (batched
// decoding, prefill), weights meet x in AMX tiles, read in place (int4 codes unpacked to bytes
// per tile). One work item is 64 weight rows (4 tiles sharing each tile of x) against every
// block of 16 rows of x, so the weights are read once at any batch up to 16. The tiles ask
// for no rows ahead: a software prefetch of each row's next bytes made them slower (the 156M
// model's matrices at 16 rows, summed: bfloat16 2.49-2.79 ms without, 3.45-3.80 with; int8
// 1.94 against 2.34-2.67; one core alone read in-place tiles as fast as a plain stream).
// - bfloat16 weights: x rounded to bfloat16, TDPBF16PS (16 weight rows x 32 columns times 32
//   columns x 16 rows of x, float32 sums): |error| <= 2^-8 * sum_j |x_j w_j| per output.
// - int8 and int4 codes: x rounded to int8 with one scale per row per `step` columns (64, or 32
//   for groups of 32; max|x| / 127), TDPBSSD (exact int32 sums of a step), each step's sums
//   scaled in float32 by x's and the weights' scales: |error| <= sum over steps of
//   max|x_step| / 254 * sum_j |w_j|, llama.cpp's rounding for Q8_0 and Q4_0 (32 columns).
// - int4 codes against more than 16 rows of x (prefill): the codes times their scales rounded
//   to bfloat16 once per work item, then as bfloat16 weights (amx_widened_item): |error| <=
//   2^-8 (1 + 2^-10) * sum_j |x_j w_j|.
constexpr int64_t kAmxRows = 16;  // rows of a tile: weight rows, or rows of x
constexpr int64_t kAmxCols = 32;  // bfloat16 columns per tile step (64 bytes a row)
constexpr int64_t kAmxTiles = 4;  // weight tiles per work item

struct TileConfig {  // the LDTILECFG memory layout (palette 1)
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// p moved up to the next 64-byte boundary (a cache line), with 64 bytes to spare behind it.
template <typename T>
T* line_aligned(T* p) {
  auto at = reinterpret_cast<uintptr_t>(p);
  return p + (64 - at % 64) % 64 / sizeof(T);
}

// n values from a cache line's start, for x's tiles: each 64-byte row of a tile then lies in
// one line. A large std::vector starts 16 bytes into its pages, so every row read two; aligned,
// the 156M layer's four matrices at 128 rows took 2-11% less time with bfloat16 weights, 1-2%
// with int8 and int4, and the same at 16 rows (two libraries called in turn in one process,
// 3 runs: in every one the aligned library was faster at 128 rows).
template <typename T>
class Aligned {
 public:
  explicit Aligned(int64_t n) : raw_(n + 64 / sizeof(T)), data_(line_aligned(raw_.data())) {}
  T* data() { return data_; }

 private:
  std::vector<T> raw_;
  T* data_;
};

// x as the tiles' second operand: per block of 16 rows of x, [k/2][16][2] bfloat16 (column
// pairs of each row side by side; rows past m are zero).
SLIMLLM_AMX void pack_x_block(const Problem& p, int64_t block, uint16_t* out) {
  std::vector<uint32_t> pairs(p.k / 2);
  for (int64_t i = 0; i < kAmxRows; ++i) {
    int64_t row = block * kAmxRows + i;
    if (row < p.m) {
      const float* x = p.x + row * p.k;
      for (int64_t j = 0; j < p.k; j += 16) {  // rounded to nearest even
        __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + j));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs.data() + j / 2), (__m256i)h);
      }
    } else {
      std::fill(pairs.begin(), pairs.end(), 0u);
    }
    uint32_t* o = reinterpret_cast<uint32_t*>(out);
    for (int64_t c = 0; c < p.k / 2; ++c) o[c * kAmxRows + i] = pairs[c];
  }
}

// Rows r[0..16) of 16 floats transposed in place: lane i of r[j] becomes lane j of r[i]
// (pairs, quads, then 128-bit blocks twice; 64 shuffles against 256 scalar moves).
SLIMLLM_AMX inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4 i + c], block k: column 4 k + c of rows 4 i .. 4 i + 3
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    r[c] = _mm512_shuffle_f32x4(v0, w0, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_f32x4(v1, w1, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + c] = _mm512_shuffle_f32x4(v0, w0, _MM_SHUFFLE(3, 1, 3, 1));
    r[12 + c] = _mm512_shuffle_f32x4(v1, w1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Sums of 16 weight rows (r[row]: its sums against the 16 rows of x of `block`, one per lane)
// into y's columns n0 .. n0 + 16, transposed to y's rows.
SLIMLLM_AMX inline void write_sums(const Problem& p, int64_t block, int64_t n0, __m512* r) {
  transpose16(r);
  for (int64_t i = 0; i < kAmxRows && block * kAmxRows + i < p.m; ++i)
    _mm512_storeu_ps(p.y + (block * kAmxRows + i) * p.n + n0, r[i]);
}

// One tile of sums, c[weight row][row of x], into y's columns n0 .. n0 + 16 for `block`.
SLIMLLM_AMX inline void write_tile(const Problem& p, int64_t block, int64_t n0, const float* c) {
  __m512 r[kAmxRows];
  for (int64_t i = 0; i < kAmxRows; ++i) r[i] = _mm512_load_ps(c + i * kAmxRows);
  write_sums(p, block, n0, r);
}

// acc (per weight row n0 + r, its sums against the 16 rows of x of `block`) into y.
SLIMLLM_AMX void write_rows(const Problem& p, int64_t block, int64_t n0, int64_t tiles,
                            const __m512* acc) {
  for (int64_t t = 0; t < tiles; ++t) {
    __m512 r[kAmxRows];
    for (int64_t i = 0; i < kAmxRows; ++i) r[i] = acc[t * kAmxRows + i];
    write_sums(p, block, n0 + t * kAmxRows, r);
  }
}

// int4 codes in the tiles' order: a byte holds columns 2t (low nibble) and 2t + 1 (high), so
// each tile row of `step` columns (32 or 64) takes that step's even columns, then its odd ones,
// and x's tile is packed in the same order (pack_x_int8), which leaves every sum unchanged.
// Column order cost an interleave and two lane permutes per 64 codes on top of this.
// Codes of one row from column j (a multiple of 64, or of 32 with one step left) as int8
// (code - 8): the step at j into `first`, and for steps of 32 the next one into `second`.
SLIMLLM_AMX inline void nibbles_tile_order(const uint8_t* row, int64_t j, int64_t k, int64_t step,
                                           int8_t* first, int8_t* second) {
  const __mmask32 bytes = j + 64 <= k ? ~0u : 0xffffu;  // 64 columns, or the last 32 alone
  __m256i b = _mm256_maskz_loadu_epi8(bytes, row + j / 2);
  __m256i nibble = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
  __m256i even = _mm256_sub_epi8(_mm256_and_si256(b, nibble), eight);
  __m256i odd = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), nibble), eight);
  if (step == 64) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(first), even);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(first + 32), odd);
    return;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(first), _mm256_permute2x128_si256(even, odd, 0x20));
  if (j + 64 <= k)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(second),
                        _mm256_permute2x128_si256(even, odd, 0x31));
}

// One work item's int8 codes in tile order: [k / cols][tiles][16 rows][cols], so that every
// tile load reads 1 KB in a row. (In place, a tile's 16 rows lie one weight row apart, all in
// the same few sets of the 48 KB L1; packing did not move the int8 tiles beyond noise. It
// unpacked int4 codes once per item instead of once per block of x, until int4 prefill took
// bfloat16 tiles: amx_widened_item.)
constexpr int64_t kPackAhead = 4;  // weight rows

SLIMLLM_AMX void pack_item(const Problem& p, int64_t n0, int64_t tiles, int64_t cols,
                           uint8_t* out) {
  const __mmask64 mask = cols == 64 ? ~0ull : 0xffffffffull;
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t r = 0; r < kAmxRows; ++r) {
      const uint8_t* row = p.w + (n0 + t * kAmxRows + r) * p.row_bytes;
      for (int64_t j = 0, s = 0; j < p.k; j += cols, ++s) {
        uint8_t* to = out + ((s * tiles + t) * kAmxRows + r) * cols;
        // rows are short (1-6 KB): ask for the rows ahead before the prefetcher ramps up
        _mm_prefetch(reinterpret_cast<const char*>(row + kPackAhead * p.row_bytes + j),
                     _MM_HINT_T0);
        _mm512_mask_storeu_epi8(to, mask, _mm512_maskz_loadu_epi8(mask, row + j));
      }
    }
}

// A thread's buffer for an item's packed or widened weights, 64-byte aligned, kept between
// calls (grown, never shrunk: no page faults once warm).
uint8_t* item_buffer(int64_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (int64_t(buffer.size()) < bytes + 64) buffer.resize(bytes + 64);
  return line_aligned(buffer.data());
}

// The in-place int4 scratch of an item: 64 columns of its 4 tiles' codes, as one step of 64 or
// two steps of 32 (the second at kScratchStep).
constexpr int64_t kScratchStep = kAmxTiles * kAmxRows * 32;

// Where an item's weight tile (column step s, tile t) lies: packed (pack_item), in place, or
// in the int4 scratch, which holds `period` steps (1, or 2 for steps of 32 columns).
struct ItemTiles {
  const uint8_t* base;
  int64_t step_bytes, tile_bytes, stride;
  bool packed;
  int64_t period = 0;  // 0: every step has its own place
  const uint8_t* at(int64_t s, int64_t t) const {
    return base + (period ? s % period : s) * step_bytes + t * tile_bytes;
  }
};

// The item's tiles: int8 codes packed where several blocks of x reuse them, else in place
// (int4, one block of x only: unpacked 64 columns at a time into a scratch of 4 tiles). At one
// block (batched decode) packing cost more than it saved (16 x 1024 @ 5632: bfloat16 0.43 ->
// 0.57 ms, int8 0.28 -> 0.37, int4 0.28 -> 0.34); at 128 rows it took int4 from 1.76-2.05 to
// 1.25-1.47 ms, int8 within noise (interleaved processes, 3 rounds). bfloat16 stays in place
// at any batch: with two blocks of x per tile load (amx_bf16_tiles), 128 rows ran faster in
// place than packed (128 x 1024 @ 5632: 1.17-1.41 ms against 1.94-2.63; 128 x 2816 @ 1024:
// 0.78-0.89 against 1.17-1.47).
template <int E>
SLIMLLM_AMX ItemTiles item_tiles(const Problem& p, int64_t n0, int64_t tiles, int64_t cols,
                                 const int8_t* int4_scratch = nullptr) {
  const int64_t value_bytes = E == kBFloat16 ? 2 : 1;  // as a tile holds them
  const int64_t row_bytes = cols * value_bytes;  // of a tile
  if (p.m <= kAmxRows || E != kInt8) {  // int4: the item unpacks its codes into the scratch
    if constexpr (E == kInt4) {
      auto scratch = reinterpret_cast<const uint8_t*>(int4_scratch);
      return {scratch, kScratchStep, kAmxRows * row_bytes, row_bytes, false,
              cols == 64 ? 1 : 2};
    }
    return {p.w + n0 * p.row_bytes, row_bytes, kAmxRows * p.row_bytes, p.row_bytes, false};
  }
  uint8_t* a = item_buffer(tiles * kAmxRows * p.k * value_bytes);
  pack_item(p, n0, tiles, cols, a);
  return {a, tiles * kAmxRows * row_bytes, kAmxRows * row_bytes, row_bytes, true};
}

// Tiles 0-3 hold an item's float32 sums: zeroed, and stored to c (one 16 x 16 tile each).
SLIMLLM_AMX inline void zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

SLIMLLM_AMX inline void store_sums(float (*c)[kAmxRows * kAmxRows]) {
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
}

// The bfloat16 tiles: y's rows n0 .. n0 + 16 * tiles (bfloat16 weights where `a` says) against
// every block of x.
SLIMLLM_AMX void amx_bf16_tiles(const Problem& p, const uint16_t* xb, int64_t n0, int64_t tiles,
                                const ItemTiles& a) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = kAmxRows, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) float c[kAmxTiles][kAmxRows * kAmxRows];
  const int64_t blocks = (p.m + kAmxRows - 1) / kAmxRows;
  int64_t block = 0;
  // Two tiles of weights times two blocks of x: each tile loaded feeds two products (128 x 1024
  // @ 5632: 1.59-1.65 ms packed with one block per pass, 1.17-1.41 in place with two); then
  // a last odd block alone.
  for (; block + 2 <= blocks; block += 2)
    for (int64_t t = 0; t < tiles; t += 2) {
      const bool pair = t + 1 < tiles;
      const uint16_t* b = xb + block * p.k * kAmxRows;
      zero_sums();
      for (int64_t j = 0, s = 0; j < p.k; j += kAmxCols, ++s) {
        _tile_loadd(4, a.at(s, t), a.stride);
        _tile_loadd(6, b + j * kAmxRows, 64);
        _tile_loadd(7, b + (p.k + j) * kAmxRows, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (pair) {
          _tile_loadd(5, a.at(s, t + 1), a.stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      store_sums(c);
      write_tile(p, block, n0 + t * kAmxRows, c[0]);
      write_tile(p, block + 1, n0 + t * kAmxRows, c[1]);
      if (pair) {
        write_tile(p, block, n0 + (t + 1) * kAmxRows, c[2]);
        write_tile(p, block + 1, n0 + (t + 1) * kAmxRows, c[3]);
      }
    }
  for (; block < blocks; ++block) {
    const uint16_t* b = xb + block * p.k * kAmxRows;
    zero_sums();
    for (int64_t j = 0, s = 0; j < p.k; j += kAmxCols, ++s) {
      _tile_loadd(5, b + j * kAmxRows, 64);
      _tile_loadd(4, a.at(s, 0), a.stride);
      _tile_dpbf16ps(0, 4, 5);
      if (tiles > 1) {
        _tile_loadd(6, a.at(s, 1), a.stride);
        _tile_dpbf16ps(1, 6, 5);
      }
      if (tiles > 2) {
        _tile_loadd(4, a.at(s, 2), a.stride);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (tiles > 3) {
        _tile_loadd(6, a.at(s, 3), a.stride);
        _tile_dpbf16ps(3, 6, 5);
      }
    }
    store_sums(c);
    for (int64_t t = 0; t < tiles; ++t) write_tile(p, block, n0 + t * kAmxRows, c[t]);
  }
  _tile_release();
}

SLIMLLM_AMX void amx_bf16_item(const Problem& p, const uint16_t* xb, int64_t n0, int64_t tiles) {
  amx_bf16_tiles(p, xb, n0, tiles, item_tiles<kBFloat16>(p, n0, tiles, kAmxCols));
}

// int4 weights against two blocks of x or more (prefill): the item's weights widened once to
// bfloat16 values (code times its group's scale, rounded to nearest even) in the tiles' order,
// [step of 32 columns][tile][16 rows][32], then met by x rounded to bfloat16 as bfloat16
// weights are, the sums staying in the tiles across every column. In int8 tiles, int4's groups
// of 32 make each 32-column step flush its int32 sums through float32 registers. The 156M
// layer's four matrices, two libraries in turn in one process: int4 at 128 rows 5.91-6.05 ->
// 4.96-5.16 ms (32 rows: 2.48 -> 2.32), with 2.4x less error (max |error| / max |y|: 0.0025
// against 0.006). int8 weights (one flush per 64 columns) were slower widened: 4.00 -> 4.93 ms.
SLIMLLM_AMX void widen_int4_item(const Problem& p, int64_t n0, int64_t tiles, uint16_t* out) {
  const __m128i nibble = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  for (int64_t r = 0; r < tiles * kAmxRows; ++r) {
    const uint8_t* w = p.w + (n0 + r) * p.row_bytes;
    uint16_t* to = out + r * kAmxCols;  // tile r / 16, row r % 16 of step 0
    for (int64_t j = 0; j < p.k; j += kAmxCols, to += tiles * kAmxRows * kAmxCols) {
      // a byte: column 2i in its low nibble, 2i + 1 in its high one; the code is nibble - 8
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j / 2));
      __m128i lo = _mm_and_si128(bytes, nibble);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      __m128i a = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight);  // columns j .. j + 16
      __m128i b = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight);  // j + 16 .. j + 32
      __m512 sc = _mm512_set1_ps(scale_of<kInt4>(p, n0 + r, j / p.group));  // a step: one group
      __m512 fa = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), sc);
      __m512 fb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), sc);
      _mm512_store_si512(to, (__m512i)_mm512_cvtne2ps_pbh(fb, fa));
    }
  }
}

SLIMLLM_AMX void amx_widened_item(const Problem& p, const uint16_t* xb, int64_t n0,
                                  int64_t tiles) {
  const int64_t tile_values = kAmxRows * kAmxCols;
  auto* wide = reinterpret_cast<uint16_t*>(item_buffer(tiles * kAmxRows * p.k * 2));
  widen_int4_item(p, n0, tiles, wide);
  const ItemTiles a{reinterpret_cast<const uint8_t*>(wide), tiles * tile_values * 2,
                    tile_values * 2, kAmxCols * 2, true};
  amx_bf16_tiles(p, xb, n0, tiles, a);
}

// 16 values times inv as int8, rounded to nearest even, within +-127.
SLIMLLM_AMX inline __m128i int8_codes(__m512 v, __m512 inv) {
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));
}

// x as int8 for TDPBSSD: per block of 16 rows, [k/4][16][4] codes (4 columns of a row side by
// side; rows past m zero) and [k/step][16] scales (max|x| / 127 over the row's step columns).
// For int4 weights each step's columns come in the codes' tile order: even ones, then odd ones.
SLIMLLM_AMX void pack_x_int8(const Problem& p, int64_t block, int64_t step, bool nibble_order,
                             int8_t* out, float* scales) {
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  alignas(64) int32_t pick[2][16];
  for (int l = 0; l < 16; ++l) pick[0][l] = 2 * l, pick[1][l] = 2 * l + 1;
  const __m512i evens = _mm512_load_si512(pick[0]), odds = _mm512_load_si512(pick[1]);
  for (int64_t i = 0; i < kAmxRows; ++i) {
    int64_t row = block * kAmxRows + i;
    const float* x = p.x + row * p.k;
    for (int64_t j0 = 0; j0 < p.k; j0 += step) {
      float top = 0.0f;
      if (row < p.m)
        for (int64_t j = j0; j < j0 + step; j += 16)
          top = std::max(top, _mm512_reduce_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + j))));
      scales[(j0 / step) * kAmxRows + i] = top / 127.0f;
      __m512 inv = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      alignas(64) uint32_t q[16] = {};  // the step's codes in tile order
      __m128i* to = reinterpret_cast<__m128i*>(q);
      for (int64_t j = j0; row < p.m && j < j0 + step; j += 32) {
        __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
        int64_t h = (j - j0) / 32;
        if (nibble_order) {
          _mm_store_si128(to + h, int8_codes(_mm512_permutex2var_ps(a, evens, b), inv));
          _mm_store_si128(to + step / 32 + h, int8_codes(_mm512_permutex2var_ps(a, odds, b), inv));
        } else {
          _mm_store_si128(to + 2 * h, int8_codes(a, inv));
          _mm_store_si128(to + 2 * h + 1, int8_codes(b, inv));
        }
      }
      for (int64_t c = 0; c < step / 4; ++c) o[(j0 / 4 + c) * kAmxRows + i] = q[c];
    }
  }
}

// acc[r] += c[r] (int32 sums) * x's scales of the step * the weight row's scale in group g.
template <int E>
SLIMLLM_AMX inline void add_int_sums(const Problem& p, const int32_t* c, __m512 xs, int64_t n0,
                                     int64_t g, __m512* acc) {
  for (int64_t r = 0; r < kAmxRows; ++r) {
    __m512 s = _mm512_mul_ps(xs, _mm512_set1_ps(scale_of<E>(p, n0 + r, g)));
    __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(c + r * kAmxRows));
    acc[r] = _mm512_fmadd_ps(sums, s, acc[r]);
  }
}

// The int8/int4 tiles: y's rows n0 .. n0 + 16 * tiles against every block of x (item_tiles).
template <int E>
SLIMLLM_AMX void amx_int_item(const Problem& p, const int8_t* xq, const float* xs, int64_t step,
                              int64_t n0, int64_t tiles) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = kAmxRows, cfg.colsb[t] = 64;  // C: int32 sums
  cfg.rows[4] = cfg.rows[6] = kAmxRows, cfg.colsb[4] = cfg.colsb[6] = step;  // A: weights
  cfg.rows[5] = step / 4, cfg.colsb[5] = 64;  // B: x
  _tile_loadconfig(&cfg);
  alignas(64) int8_t unpacked[kAmxTiles * kAmxRows * 64];  // int4 in place: 64 columns
  const ItemTiles a = item_tiles<E>(p, n0, tiles, step, unpacked);
  alignas(64) int32_t c[kAmxRows * kAmxRows];
  __m512 acc[kAmxTiles * kAmxRows];
  for (int64_t block = 0; block * kAmxRows < p.m; ++block) {
    const int8_t* b = xq + block * p.k * kAmxRows;
    const float* bs = xs + block * (p.k / step) * kAmxRows;
    for (int64_t r = 0; r < tiles * kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0, s = 0; j < p.k; j += step, ++s) {
      if constexpr (E == kInt4) {
        if (!a.packed && j % 64 == 0)  // the codes of this step (and the next) as bytes
          for (int64_t r = 0; r < tiles * kAmxRows; ++r)
            nibbles_tile_order(p.w + (n0 + r) * p.row_bytes, j, p.k, step, unpacked + r * step,
                               unpacked + kScratchStep + r * step);
      }
      _tile_loadd(5, b + j * kAmxRows, 64);
      _tile_zero(0);
      _tile_loadd(4, a.at(s, 0), a.stride);
      _tile_dpbssd(0, 4, 5);
      if (tiles > 1) {
        _tile_zero(1);
        _tile_loadd(6, a.at(s, 1), a.stride);
        _tile_dpbssd(1, 6, 5);
      }
      if (tiles > 2) {
        _tile_zero(2);
        _tile_loadd(4, a.at(s, 2), a.stride);
        _tile_dpbssd(2, 4, 5);
      }
      if (tiles > 3) {
        _tile_zero(3);
        _tile_loadd(6, a.at(s, 3), a.stride);
        _tile_dpbssd(3, 6, 5);
      }
      __m512 x_scales = _mm512_loadu_ps(bs + (j / step) * kAmxRows);
      int64_t g = j / p.group;
      _tile_stored(0, c, 64);
      add_int_sums<E>(p, c, x_scales, n0, g, acc);
      if (tiles > 1) {
        _tile_stored(1, c, 64);
        add_int_sums<E>(p, c, x_scales, n0 + kAmxRows, g, acc + kAmxRows);
      }
      if (tiles > 2) {
        _tile_stored(2, c, 64);
        add_int_sums<E>(p, c, x_scales, n0 + 2 * kAmxRows, g, acc + 2 * kAmxRows);
      }
      if (tiles > 3) {
        _tile_stored(3, c, 64);
        add_int_sums<E>(p, c, x_scales, n0 + 3 * kAmxRows, g, acc + 3 * kAmxRows);
      }
    }
    write_rows(p, block, n0, tiles, acc);
  }
  _tile_release();
}

// x rounded to int8 per step, against int8 codes or (one block of x) int4 codes in int8 tiles.
template <int E>
void run_amx_int(ffi::ThreadPool& pool, const Problem& p, int64_t blocks, int64_t items) {
  const int64_t per = kAmxTiles * kAmxRows, step = p.group % 64 == 0 ? 64 : 32;
  Aligned<int8_t> xq(blocks * p.k * kAmxRows);
  std::vector<float> xs(blocks * (p.k / step) * kAmxRows);
  parallel_for(pool, blocks, [&](int64_t block) {
    pack_x_int8(p, block, step, E == kInt4, xq.data() + block * p.k * kAmxRows,
                xs.data() + block * (p.k / step) * kAmxRows);
  }, p.m <= kStayRows);
  parallel_for(pool, items, [&](int64_t item) {
    int64_t n0 = item * per;
    amx_int_item<E>(p, xq.data(), xs.data(), step, n0, std::min(kAmxTiles, (p.n - n0) / kAmxRows));
  }, p.m <= kStayRows);
}

template <int E>
void run_amx(ffi::ThreadPool& pool, const Problem& p) {
  int64_t blocks = (p.m + kAmxRows - 1) / kAmxRows;
  int64_t per = kAmxTiles * kAmxRows, items = (p.n + per - 1) / per;
  if constexpr (scaled(E)) {  // int4 against several blocks of x: bfloat16 tiles, below
    if (E == kInt8 || blocks == 1) return run_amx_int<E>(pool, p, blocks, items);
  }
  Aligned<uint16_t> xb(blocks * p.k * kAmxRows);
  parallel_for(pool, blocks, [&](int64_t block) {
    pack_x_block(p, block, xb.data() + block * p.k * kAmxRows);
  }, p.m <= kStayRows);
  parallel_for(pool, items, [&](int64_t item) {
    int64_t n0 = item * per, tiles = std::min(kAmxTiles, (p.n - n0) / kAmxRows);
    if constexpr (E == kInt4)
      amx_widened_item(p, xb.data(), n0, tiles);
    else
      amx_bf16_item(p, xb.data(), n0, tiles);
  }, p.m <= kStayRows);
}

// ---------------------------------------------------------------- bfloat16 pairs (kernels "fast")
//
// With `integer` set on a CPU with AVX512-BF16 but no AMX (`has_avx512_bf16()`: Zen 4, Cooper
// Lake) and more than kTileX rows of x (batched decoding, prefill), weights meet x in VDPBF16PS:
// each lane sums two bfloat16 products in float32, 32 products an instruction against the
// float32 FMA's 16 (on the 2-core Zen 4 here, a batch-16 step of the 156M model multiplies
// 4 GFLOP, 13 ms at the FMA peak). x is rounded to bfloat16 once per call. bfloat16 weights are
// read as stored; int8 and int4 codes that take neither the quads nor the lanes below (int8 in
// groups of 32, int4 in groups other than 32) are widened per tile of kTileRows weight rows to
// bfloat16 values (code times its group's scale, rounded to nearest even) in a buffer that
// stays in L1 while every row of x passes over it. A register tile is 4 weight rows times 4
// rows of x: 16 sums, 8 loads per 16 products.
// - bfloat16 weights: |error| <= 2^-8 * sum_j |x_j w_j| per output (x's rounding; the products
//   are exact and summed in float32);
// - int8 and int4 codes: |error| <= 2^-8 (1 + 2^-10) * sum_j |x_j w_j| (x's and the widened
//   weight's rounding).

constexpr int64_t kPairCols = 32;  // bfloat16 columns per VDPBF16PS

// Every row of x in passes over one register tile of weights: kTileX rows of x a pass, then
// the 1-3 left. Pass t asks for the stored weight row at next + t * row_bytes (t < ahead),
// `lines` cache lines of it, so that memory streams the rows of a later tile while the passes
// multiply. tile(std::integral_constant<int, MX>, first row of x, row to ask for, its lines).
template <typename Tile>
SLIMLLM_AVX512_BF16 void passes(const Problem& p, const uint8_t* next, int64_t ahead,
                                int64_t row_bytes, int64_t lines, Tile tile) {
  auto row = [&](int64_t t) { return t < ahead ? next + t * row_bytes : nullptr; };
  int64_t i = 0, pass = 0;
  for (; i + kTileX <= p.m; i += kTileX, ++pass)
    tile(std::integral_constant<int, kTileX>(), i, row(pass), pass < ahead ? lines : 0);
  const uint8_t* last = row(pass);
  const int64_t last_lines = last ? lines : 0;
  switch (p.m - i) {
    case 3: tile(std::integral_constant<int, 3>(), i, last, last_lines); break;
    case 2: tile(std::integral_constant<int, 2>(), i, last, last_lines); break;
    case 1: tile(std::integral_constant<int, 1>(), i, last, last_lines); break;
    default: break;
  }
}

// k values of x rounded to bfloat16 (nearest even); k is a multiple of kPairCols.
SLIMLLM_AVX512_BF16 void round_row_bf16(const float* x, int64_t k, uint16_t* out) {
  for (int64_t j = 0; j < k; j += kPairCols) {
    __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j));
    _mm512_storeu_si512(out + j, (__m512i)h);
  }
}

// One weight row's codes times their scales as bfloat16 values (nearest even), k of them.
template <int E>
SLIMLLM_AVX512_BF16 void widen_row_bf16(const Problem& p, int64_t row, uint16_t* out) {
  const uint8_t* w = p.w + row * p.row_bytes;
  for (int64_t j = 0; j < p.k; j += kPairCols) {
    __m128i a, b;  // the codes of columns j .. j + 16 and j + 16 .. j + 32, as int8
    if constexpr (E == kInt8) {
      a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j));
      b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 16));
    } else {  // a byte: column 2i in its low nibble, 2i + 1 in its high one; code = nibble - 8
      const __m128i nibble = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j / 2));
      __m128i lo = _mm_and_si128(bytes, nibble);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      a = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight);
      b = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight);
    }
    __m512 sc = _mm512_set1_ps(scale_of<E>(p, row, j / p.group));  // 32 columns: one group
    __m512 fa = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), sc);
    __m512 fb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), sc);
    _mm512_store_si512(out + j, (__m512i)_mm512_cvtne2ps_pbh(fb, fa));
  }
}

// The sums of 16 vectors' lanes: lane t of the result is the sum of v[t]'s 16 lanes. Four
// rounds, each adding two halves of every pair of vectors (45 instructions for 16 sums,
// against ~8 each for a reduction of one vector at a time).
SLIMLLM_AVX512_BF16 inline __m512 lane_sums(const __m512* v) {
  // the rounds leave the sum of the vector they take as t in lane kFrom[t] (a permutation that
  // is its own inverse), so they take v[kFrom[t]] as t
  static constexpr int kFrom[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 a[8], b[4], c[2];
  for (int t = 0; t < 8; ++t) {  // 256-bit halves: v[t] low, v[t + 8] high
    __m512 u = v[kFrom[t]], w = v[kFrom[t + 8]];
    a[t] = _mm512_add_ps(_mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int t = 0; t < 4; ++t)  // 128-bit blocks
    b[t] = _mm512_add_ps(_mm512_shuffle_f32x4(a[t], a[t + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[t], a[t + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int t = 0; t < 2; ++t) {  // pairs of lanes
    __m512d u = _mm512_castps_pd(b[t]), w = _mm512_castps_pd(b[t + 2]);
    c[t] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, w)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(u, w)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// y[i, r] for RB weight rows (w[r]: k bfloat16 values) and MX rows of x (bfloat16, k apart from
// xb), one pass over k; y's rows are n apart. Asks for `lines` cache lines from `ahead` on, one
// per 32 columns.
template <int RB, int MX>
SLIMLLM_AVX512_BF16 void pairs_tile(const uint16_t* const* w, const uint16_t* xb, int64_t k,
                                    float* y, int64_t n, const uint8_t* ahead, int64_t lines) {
  __m512 acc[MX * RB];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t j = 0, s = 0; j < k; j += kPairCols, ++s) {
    if (s < lines) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * s), _MM_HINT_T0);
    __m512bh wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w[r] + j);
    for (int i = 0; i < MX; ++i) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + i * k + j);
      for (int r = 0; r < RB; ++r) acc[i * RB + r] = _mm512_dpbf16_ps(acc[i * RB + r], wv[r], xv);
    }
  }
  if constexpr (MX * RB == 16 && RB == 4) {
    alignas(64) float sums[16];
    _mm512_store_ps(sums, lane_sums(acc));
    for (int i = 0; i < MX; ++i) _mm_storeu_ps(y + i * n, _mm_load_ps(sums + 4 * i));
  } else {
    for (int i = 0; i < MX; ++i)
      for (int r = 0; r < RB; ++r) y[i * n + r] = _mm512_reduce_add_ps(acc[i * RB + r]);
  }
}

// Every row of x against RB weight rows w (RB <= kTileRows), into y's columns r0 .. r0 + RB.
// The passes over the tile ask for the rows `ahead` (row_bytes apart, from `next` on) between
// them: one row a pass, so that memory streams while the passes multiply. (At 16 rows of x,
// asking only in the first pass left memory idle for the other three.)
template <int RB>
SLIMLLM_AVX512_BF16 void pairs_rows(const Problem& p, const uint16_t* xb,
                                    const uint16_t* const* w, int64_t r0, const uint8_t* next,
                                    int64_t ahead, int64_t row_bytes) {
  float* y = p.y + r0;
  passes(p, next, ahead, row_bytes, (row_bytes + 63) / 64,
         [&](auto mx, int64_t i, const uint8_t* asked, int64_t lines) SLIMLLM_AVX512_BF16 {
           pairs_tile<RB, decltype(mx)::value>(w, xb + i * p.k, p.k, y + i * p.n, p.n, asked,
                                               lines);
         });
}

// Weight rows r0 .. r1 against every row of x, kTileRows rows at a time.
template <int E>
SLIMLLM_AVX512_BF16 void pairs_chunk(const Problem& p, const uint16_t* xb, int64_t r0,
                                     int64_t r1) {
  uint16_t* wide = E == kBFloat16
                       ? nullptr
                       : reinterpret_cast<uint16_t*>(item_buffer(kTileRows * p.k * 2));
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const int64_t rows = std::min(kTileRows, r1 - r);
    const uint16_t* w[kTileRows];
    for (int64_t t = 0; t < rows; ++t) {
      if constexpr (E == kBFloat16) {
        w[t] = reinterpret_cast<const uint16_t*>(p.w + (r + t) * p.row_bytes);
      } else {
        widen_row_bf16<E>(p, r + t, wide + t * p.k);
        w[t] = wide + t * p.k;
      }
    }
    // the rows two tiles on, as stored (past the matrix's end: harmless)
    const uint8_t* next = p.w + (r + 2 * kTileRows) * p.row_bytes;
    if (rows == kTileRows) {
      pairs_rows<kTileRows>(p, xb, w, r, next, kTileRows, p.row_bytes);
    } else {
      for (int64_t t = 0; t < rows; ++t) pairs_rows<1>(p, xb, w + t, r + t, next, 0, 0);
    }
  }
}

template <int E>
void run_pairs(ffi::ThreadPool& pool, const Problem& p) {
  Aligned<uint16_t> xb(p.m * p.k);
  for (int64_t i = 0; i < p.m; ++i) round_row_bf16(p.x + i * p.k, p.k, xb.data() + i * p.k);
  int64_t chunks = (p.n + kChunkRows - 1) / kChunkRows;
  parallel_for(pool, chunks, [&](int64_t c) {
    int64_t r0 = c * kChunkRows;
    pairs_chunk<E>(p, xb.data(), r0, std::min(p.n, r0 + kChunkRows));
  }, p.m <= kStayRows);
}

// ---------------------------------------------------------------- bfloat16 columns (prefill)
//
// At prefill's row counts (more than 16 rows of x), bfloat16 weights meet x the other
// way round from the pairs: a work item copies its block of 16 V weight rows once into pair
// order (for each pair of columns, the block's rows side by side: a 16 x 16 transpose of 32-bit
// pairs per 16 rows and 32 columns), then every row of x passes over the copy with each of its
// pairs broadcast to a whole vector (VDPBF16PS's 32-bit broadcast operand), so that lane t sums
// weight row t's products. A register tile of kColumnsX rows of x against 3 vectors of rows
// holds 24 sums and loads 3 vectors per 24 instructions (the pairs' 4 x 4 tile loads 8 per 16),
// and its sums need no reduction across lanes. While its tiles multiply, a block asks for the
// stored rows of the block two on (the other thread takes the one between), so that the next
// copy reads from the cache; without that the copies left memory idle and the road lost to the
// pairs at 128 rows. The copy costs the same whatever m is: at 16 rows of x it cost more than
// the tile saved, so decode batches keep the pairs. The rounding is the pairs' (x to bfloat16
// once per call); only the order of the float32 sums differs.
//   Weights stored in pair order (`Problem::pairs`: the JAX backend puts bfloat16 linear
// weights so for kernels "fast" on these CPUs) need no copy: every block's 16-row groups are
// read where they lie, for any number of rows of x, decode's included.

constexpr int64_t kColumnsX = 8;  // rows of x per register tile
constexpr int kColumnsVectors = 3;  // vectors of 16 weight rows per block (a work item)
constexpr int64_t kColumnsBlock = 16 * kColumnsVectors;
constexpr int64_t kColumnsMinX = kStayRows + 1;  // at 16 rows the copy costs more than it saves

// r[t] lane c becomes r[c] lane t (32-bit lanes): 32-bit, then 64-bit interleaves within
// 128-bit blocks, then two rounds of 128-bit block shuffles.
SLIMLLM_AVX512_BF16 inline void transpose16(__m512i* r) {
  __m512i a[16], b[16];
  for (int t = 0; t < 16; t += 2) {
    a[t] = _mm512_unpacklo_epi32(r[t], r[t + 1]);
    a[t + 1] = _mm512_unpackhi_epi32(r[t], r[t + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // b[g + c], 128-bit block l: rows g .. g + 3 of column 4l + c
    b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit blocks
    __m512i lo = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x88);  // blocks 0, 2 of each
    __m512i hi = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xdd);  // blocks 1, 3
    __m512i lo2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x88);
    __m512i hi2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(lo, lo2, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(lo, lo2, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(hi, hi2, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(hi, hi2, 0xdd);
  }
}

// Weight rows r0 .. r0 + 16 V in pair order: out[16 V j + t] holds row r0 + t's columns 2j and
// 2j + 1.
template <int V>
SLIMLLM_AVX512_BF16 void pair_order(const Problem& p, int64_t r0, uint32_t* out) {
  for (int64_t j = 0; j < p.k; j += kPairCols)
    for (int v = 0; v < V; ++v) {
      __m512i r[16];
      const uint8_t* rows = p.w + (r0 + 16 * v) * p.row_bytes + 2 * j;
      for (int t = 0; t < 16; ++t) r[t] = _mm512_loadu_si512(rows + t * p.row_bytes);
      transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_store_si512(out + (j / 2 + c) * 16 * V + 16 * v, r[c]);
    }
}

// Where pair j of 16-row group v lies in a block in pair order: the copy interleaves its V
// groups (pair j of all 16 V rows side by side), stored weights keep each group whole (8 k
// pairs a group).
template <int V, bool Stored>
inline const uint32_t* pair_at(const uint32_t* w, int64_t k, int64_t j, int v) {
  return Stored ? w + v * 8 * k + j * 16 : w + (j * V + v) * 16;
}

// y[i, t] for MX rows of x (bfloat16, k apart from xb) against the 16 V weight rows in pair
// order at w; y's rows are n apart.
template <int V, int MX, bool Stored>
SLIMLLM_AVX512_BF16 void columns_tile(const uint32_t* w, const uint16_t* xb, int64_t k, float* y,
                                      int64_t n, const uint8_t* ahead, int64_t lines) {
  __m512 acc[MX][V];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < k / 2; ++j) {
    if (j < lines) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * j), _MM_HINT_T0);
    __m512bh wv[V];
    for (int v = 0; v < V; ++v)
      wv[v] = (__m512bh)_mm512_loadu_si512(pair_at<V, Stored>(w, k, j, v));
    for (int i = 0; i < MX; ++i) {
      int32_t pair;
      std::memcpy(&pair, xb + i * k + 2 * j, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], wv[v], xv);
    }
  }
  for (int i = 0; i < MX; ++i)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + i * n + 16 * v, acc[i][v]);
}

// The last m % kColumnsX rows of x (`left` of them, fewer than MX + 1) in one tile.
template <int V, int MX, bool Stored>
SLIMLLM_AVX512_BF16 void columns_rest(const uint32_t* w, const uint16_t* xb, int64_t k, float* y,
                                      int64_t n, int64_t left) {
  if constexpr (MX > 0) {
    if (left == MX) return columns_tile<V, MX, Stored>(w, xb, k, y, n, nullptr, 0);
    columns_rest<V, MX - 1, Stored>(w, xb, k, y, n, left);
  }
}

// Weight rows r0 .. r0 + 16 V against every row of x (copied into pair order unless Stored so).
template <int V, bool Stored>
SLIMLLM_AVX512_BF16 void columns_block(const Problem& p, const uint16_t* xb, int64_t r0) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(p.w + r0 * p.row_bytes);
  if constexpr (!Stored) {
    auto* copy = reinterpret_cast<uint32_t*>(item_buffer(16 * V * p.k * 2));
    pair_order<V>(p, r0, copy);
    w = copy;
  }
  float* y = p.y + r0;
  // the block two on (the other thread's items lie between), its lines spread over the tiles
  const uint8_t* next = p.w + (r0 + 2 * kColumnsBlock) * p.row_bytes;
  const int64_t total = r0 + 3 * kColumnsBlock <= p.n ? kColumnsBlock * p.row_bytes / 64 : 0;
  const int64_t per = (total + p.m / kColumnsX - 1) / std::max<int64_t>(1, p.m / kColumnsX);
  int64_t i = 0;
  for (int64_t t = 0; i + kColumnsX <= p.m; i += kColumnsX, ++t)
    columns_tile<V, kColumnsX, Stored>(w, xb + i * p.k, p.k, y + i * p.n, p.n, next + 64 * per * t,
                                       std::max<int64_t>(0, std::min(per, total - per * t)));
  columns_rest<V, kColumnsX - 1, Stored>(w, xb + i * p.k, p.k, y + i * p.n, p.n, p.m - i);
}

template <bool Stored>
void columns_rows(const Problem& p, const uint16_t* xb, int64_t r0, int64_t rows) {
  static_assert(kColumnsVectors == 3);
  switch (rows / 16) {
    case 3: columns_block<3, Stored>(p, xb, r0); break;
    case 2: columns_block<2, Stored>(p, xb, r0); break;
    case 1: columns_block<1, Stored>(p, xb, r0); break;
    default: break;
  }
}

void run_columns(ffi::ThreadPool& pool, const Problem& p) {
  Aligned<uint16_t> xb(p.m * p.k);
  for (int64_t i = 0; i < p.m; ++i) round_row_bf16(p.x + i * p.k, p.k, xb.data() + i * p.k);
  const int64_t blocks = (p.n + kColumnsBlock - 1) / kColumnsBlock;
  parallel_for(pool, blocks, [&](int64_t b) {
    const int64_t r0 = b * kColumnsBlock, rows = std::min(kColumnsBlock, p.n - r0);
    if (p.pairs) return columns_rows<true>(p, xb.data(), r0, rows);  // n % 16 == 0 (`linear`)
    columns_rows<false>(p, xb.data(), r0, rows);
    for (int64_t r = r0 + rows / 16 * 16; r < r0 + rows; ++r) {  // the last n % 16 rows
      const uint16_t* w = reinterpret_cast<const uint16_t*>(p.w + r * p.row_bytes);
      pairs_rows<1>(p, xb.data(), &w, r, nullptr, 0, 0);
    }
  }, p.m <= kStayRows);
}

// ---------------------------------------------------------------- int8 quads (kernels "fast")
//
// int8 codes on the same CPUs and batches (more than kTileX rows of x, no AMX) meet x in
// VPDPBUSD instead: each lane sums four byte products in int32, 64 products an instruction,
// twice VDPBF16PS's. x is rounded to int8 and stored unsigned (code + 128, its top bit
// flipped); the codes are read as stored, and each lane of a tile's weight row starts from -128
// times the sum of its codes, taken once per tile (VPDPBUSD with ones) and shared by every row
// of x. A lane holds 4 neighbouring columns of every 64, so x's scales follow the lanes: one
// scale per row of x per lane per span of up to 1024 columns (16 vectors) within a weight group,
// the 64 columns 4l .. 4l + 3 of each 64 (max|x| / 127 over them). The int32 sums then run a
// whole span and are scaled once, by one vector of x's scales (times the weight row's scale of
// the span's group where rows have several; else once at the end).
//   |error| <= sum over x's 64-column groups G of max|x_G| / 254 * sum_{j in G} |w_j| per output.

constexpr int64_t kQuadCols = 64;  // columns per VPDPBUSD
constexpr int64_t kSpanCols = 16 * kQuadCols;  // columns an x scale's lanes spread over

// x's spans: columns [start, start + cols) within one weight group.
struct Span {
  int64_t start, cols, group;
};

std::vector<Span> quad_spans(const Problem& p) {
  std::vector<Span> spans;
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t c = g * p.group; c < (g + 1) * p.group; c += kSpanCols)
      spans.push_back({c, std::min(kSpanCols, (g + 1) * p.group - c), g});
  return spans;
}

// Row x (k values) as int8 codes + 128, and per span its lanes' scales.
SLIMLLM_AVX512_BF16 void round_row_quads(const float* x, const std::vector<Span>& spans,
                                         uint8_t* codes, float* scales) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (size_t s = 0; s < spans.size(); ++s) {
    const Span& span = spans[s];
    __m512 top[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};  // float lane f of top[q]: column 16q + f of each 64
    for (int64_t j = span.start; j < span.start + span.cols; j += kQuadCols)
      for (int q = 0; q < 4; ++q)
        top[q] = _mm512_max_ps(top[q], _mm512_abs_ps(_mm512_loadu_ps(x + j + 16 * q)));
    __m512 inv[4];
    alignas(64) float lane_top[64];
    for (int q = 0; q < 4; ++q) {  // the max of each 4 neighbouring columns, in all 4 lanes
      __m512 t = _mm512_max_ps(top[q], _mm512_permute_ps(top[q], _MM_SHUFFLE(2, 3, 0, 1)));
      t = _mm512_max_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
      _mm512_store_ps(lane_top + 16 * q, t);
      __mmask16 zero = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_EQ_OQ);
      inv[q] = _mm512_maskz_div_ps(~zero, _mm512_set1_ps(127.0f), t);
    }
    for (int l = 0; l < 16; ++l) scales[s * 16 + l] = lane_top[4 * l] / 127.0f;
    for (int64_t j = span.start; j < span.start + span.cols; j += kQuadCols) {
      __m128i c[4];
      for (int q = 0; q < 4; ++q)  // rounded to nearest even, within +-127
        c[q] = _mm512_cvtsepi32_epi8(
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j + 16 * q), inv[q])));
      __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set_m128i(c[1], c[0])), _mm256_set_m128i(c[3], c[2]), 1);
      _mm512_storeu_si512(codes + j, _mm512_xor_si512(v, flip));
    }
  }
}

// x as the quads take it: codes + 128 [m][k], and per row and span 16 scales.
struct QuadX {
  const uint8_t* codes;
  const float* scales;
  const Span* spans;
  int64_t n_spans;
};

// Per span, -128 times the sums of RB weight rows' codes in each lane: [span][RB][16].
template <int RB>
SLIMLLM_AVX512_BF16 void quads_starts(const Problem& p, const QuadX& xq, int64_t r0,
                                      int32_t* starts) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t s = 0; s < xq.n_spans; ++s) {
    const Span& span = xq.spans[s];
    for (int r = 0; r < RB; ++r) {
      const uint8_t* w = p.w + (r0 + r) * p.row_bytes;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t j = span.start; j < span.start + span.cols; j += kQuadCols)
        sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(w + j));
      _mm512_store_si512(starts + (s * RB + r) * 16, _mm512_slli_epi32(_mm512_sub_epi32(
                                                         _mm512_setzero_si512(), sum), 7));
    }
  }
}

// y[i, r] for RB int8 weight rows from r0 and MX rows of x from i0, one pass over k.
template <int RB, int MX>
SLIMLLM_AVX512_BF16 void quads_tile(const Problem& p, const QuadX& xq, const int32_t* starts,
                                    int64_t r0, int64_t i0, const uint8_t* ahead, int64_t lines) {
  const bool grouped = p.groups > 1;
  const int8_t* w[RB];
  for (int r = 0; r < RB; ++r) w[r] = reinterpret_cast<const int8_t*>(p.w + (r0 + r) * p.row_bytes);
  __m512 acc[MX * RB];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t s = 0, line = 0; s < xq.n_spans; ++s) {
    const Span& span = xq.spans[s];
    __m512i sum[MX * RB];
    for (int r = 0; r < RB; ++r) {
      __m512i start = _mm512_load_si512(starts + (s * RB + r) * 16);
      for (int i = 0; i < MX; ++i) sum[i * RB + r] = start;
    }
    for (int64_t j = span.start; j < span.start + span.cols; j += kQuadCols, ++line) {
      if (line < lines) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * line), _MM_HINT_T0);
      __m512i wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_si512(w[r] + j);
      for (int i = 0; i < MX; ++i) {
        __m512i xv = _mm512_loadu_si512(xq.codes + (i0 + i) * p.k + j);
        for (int r = 0; r < RB; ++r)
          sum[i * RB + r] = _mm512_dpbusd_epi32(sum[i * RB + r], xv, wv[r]);
      }
    }
    for (int i = 0; i < MX; ++i) {
      __m512 xs = _mm512_loadu_ps(xq.scales + ((i0 + i) * xq.n_spans + s) * 16);
      for (int r = 0; r < RB; ++r) {
        __m512 sc = grouped ? _mm512_mul_ps(xs, _mm512_set1_ps(scale_of<kInt8>(p, r0 + r, span.group)))
                            : xs;
        acc[i * RB + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i * RB + r]), sc, acc[i * RB + r]);
      }
    }
  }
  float* y = p.y + i0 * p.n + r0;
  if constexpr (MX * RB == 16 && RB == 4) {
    alignas(64) float sums[16];
    __m512 row_scales = grouped ? _mm512_set1_ps(1.0f)
                                : _mm512_castps128_ps512(scales_4<kInt8>(p, r0, 0, 15));
    row_scales = _mm512_shuffle_f32x4(row_scales, row_scales, 0);  // lane i * 4 + r: row r's
    _mm512_store_ps(sums, _mm512_mul_ps(lane_sums(acc), row_scales));
    for (int i = 0; i < MX; ++i) _mm_storeu_ps(y + i * p.n, _mm_load_ps(sums + 4 * i));
  } else {
    for (int i = 0; i < MX; ++i)
      for (int r = 0; r < RB; ++r)
        y[i * p.n + r] =
            _mm512_reduce_add_ps(acc[i * RB + r]) * (grouped ? 1.0f : scale_of<kInt8>(p, r0 + r, 0));
  }
}

// Every row of x against RB weight rows from r0, asking for the rows two tiles on between the
// passes (as pairs_rows does).
template <int RB>
SLIMLLM_AVX512_BF16 void quads_rows(const Problem& p, const QuadX& xq, int64_t r0) {
  constexpr int64_t kStackSpans = 96;  // rows of up to 96K columns (fewer in many groups)
  alignas(64) int32_t starts[kStackSpans * kTileRows * 16];
  std::vector<int32_t> more;  // more spans than that: on the heap
  int32_t* lane_starts = starts;
  if (xq.n_spans * RB * 16 > int64_t(sizeof(starts) / sizeof(int32_t))) {
    more.resize(xq.n_spans * RB * 16 + 16);
    lane_starts = line_aligned(more.data());
  }
  quads_starts<RB>(p, xq, r0, lane_starts);
  // the passes written out, not through `passes`: given the tile as a lambda there, the quads
  // ran 2x slower (16 rows: 2.5 -> 4.7 ms, 128 rows: 16.2 -> 33.0; the same code otherwise)
  const uint8_t* next = p.w + (r0 + 2 * kTileRows) * p.row_bytes;
  const int64_t lines = RB == kTileRows ? p.k / kQuadCols : 0, ahead = RB == kTileRows ? RB : 0;
  auto row = [&](int64_t at) { return at < ahead ? next + at * p.row_bytes : nullptr; };
  int64_t i = 0, pass = 0;
  for (; i + kTileX <= p.m; i += kTileX, ++pass)
    quads_tile<RB, kTileX>(p, xq, lane_starts, r0, i, row(pass), pass < ahead ? lines : 0);
  const uint8_t* last = row(pass);
  const int64_t last_lines = last ? lines : 0;
  switch (p.m - i) {
    case 3: quads_tile<RB, 3>(p, xq, lane_starts, r0, i, last, last_lines); break;
    case 2: quads_tile<RB, 2>(p, xq, lane_starts, r0, i, last, last_lines); break;
    case 1: quads_tile<RB, 1>(p, xq, lane_starts, r0, i, last, last_lines); break;
    default: break;
  }
}

void run_quads(ffi::ThreadPool& pool, const Problem& p) {
  const std::vector<Span> spans = quad_spans(p);
  const int64_t n_spans = int64_t(spans.size());
  Aligned<uint8_t> codes(p.m * p.k);
  std::vector<float> scales(p.m * n_spans * 16);
  for (int64_t i = 0; i < p.m; ++i)
    round_row_quads(p.x + i * p.k, spans, codes.data() + i * p.k, scales.data() + i * n_spans * 16);
  const QuadX xq{codes.data(), scales.data(), spans.data(), n_spans};
  int64_t chunks = (p.n + kChunkRows - 1) / kChunkRows;
  parallel_for(pool, chunks, [&](int64_t c) {
    int64_t r = c * kChunkRows, r1 = std::min(p.n, r + kChunkRows);
    for (; r + kTileRows <= r1; r += kTileRows) quads_rows<kTileRows>(p, xq, r);
    for (; r < r1; ++r) quads_rows<1>(p, xq, r);
  }, p.m <= kStayRows);
}

// ---------------------------------------------------------------- int4 lanes (kernels "fast")
//
// int4 codes in groups of 32 on the same CPUs and batches take VPDPBUSD too, with the sums of
// each lane kept to one group: a tile's weight rows are widened once to bytes (code + 8) in
// "group lanes", per block of 512 columns (16 groups) 8 vectors whose lane l holds 4 columns of
// group l (vector 2u the even columns 8u .. 8u + 6 of each group, 2u + 1 the odd ones): a 4 x 4
// transpose of the stored bytes' 32-bit words, then a nibble split, 24 instructions per 512
// codes (widening them to bfloat16 took ~190). x is rounded to int8 per group of 32 columns
// (max|x| / 127, as Q8_0 rounds it) and packed in the same order, each lane starting from -8
// times its x codes' sum, so that a lane's int32 sums run a whole block and are scaled once
// per block by the weight row's 16 group scales (as stored) times x's.
//   |error| <= sum over 32-column groups G of max|x_G| / 254 * sum_{j in G} |w_j| per output.

constexpr int64_t kLaneBlock = 512;  // columns per block: 16 groups of 32

// 256 bytes in group-major order (16 groups of 16 bytes, z[q] holding groups 4q .. 4q + 3) as
// 4 vectors: lane l of d[u] is the 32-bit word u of group l.
SLIMLLM_AVX512_BF16 inline void group_words(const __m512i* z, __m512i* d) {
  // lane 4u + c of t[q]: word u of block c of z[q], so block u of t[q] holds word u of its groups
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  __m512i t[4];
  for (int q = 0; q < 4; ++q) t[q] = _mm512_permutexvar_epi32(idx, z[q]);
  __m512i a = _mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0));
  __m512i b = _mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2));
  __m512i c = _mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0));
  __m512i e = _mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2));
  d[0] = _mm512_shuffle_i32x4(a, c, _MM_SHUFFLE(2, 0, 2, 0));
  d[1] = _mm512_shuffle_i32x4(a, c, _MM_SHUFFLE(3, 1, 3, 1));
  d[2] = _mm512_shuffle_i32x4(b, e, _MM_SHUFFLE(2, 0, 2, 0));
  d[3] = _mm512_shuffle_i32x4(b, e, _MM_SHUFFLE(3, 1, 3, 1));
}

// The 4 vectors of `bytes` (<= 256, a multiple of 16) group-major bytes from `at`, zero past them.
SLIMLLM_AVX512_BF16 inline void load_groups(const uint8_t* at, int64_t bytes, __m512i* z) {
  for (int q = 0; q < 4; ++q) {
    int64_t left = std::max<int64_t>(0, std::min<int64_t>(64, bytes - 64 * q));
    __mmask64 mask = left == 64 ? ~0ull : (1ull << left) - 1;
    z[q] = _mm512_maskz_loadu_epi8(mask, at + 64 * q);
  }
}

// One weight row's int4 codes in group lanes, code + 8 a byte: [blocks][8][64].
SLIMLLM_AVX512_BF16 void widen_row_lanes(const uint8_t* row, int64_t k, uint8_t* out) {
  const __m512i nibble = _mm512_set1_epi8(15);
  for (int64_t b = 0; b * kLaneBlock < k; ++b) {
    __m512i z[4], d[4];
    load_groups(row + b * kLaneBlock / 2, std::min(kLaneBlock, k - b * kLaneBlock) / 2, z);
    group_words(z, d);
    for (int u = 0; u < 4; ++u) {  // a byte: column 2c in its low nibble, 2c + 1 in its high one
      _mm512_store_si512(out + (b * 8 + 2 * u) * 64, _mm512_and_si512(d[u], nibble));
      _mm512_store_si512(out + (b * 8 + 2 * u + 1) * 64,
                         _mm512_and_si512(_mm512_srli_epi16(d[u], 4), nibble));
    }
  }
}

// x as the lanes take it: per row, codes [blocks][8][64], scales [blocks][16] and starting
// sums [blocks][16] (groups past k: zero).
struct LaneX {
  const int8_t* codes;
  const float* scales;
  const int32_t* starts;
  int64_t blocks;
};

// Row x (k values) in group lanes.
SLIMLLM_AVX512_BF16 void round_row_lanes(const float* x, int64_t k, int8_t* codes, float* scales,
                                         int32_t* starts) {
  alignas(64) int32_t pick[2][16];
  for (int l = 0; l < 16; ++l) pick[0][l] = 2 * l, pick[1][l] = 2 * l + 1;
  const __m512i evens = _mm512_load_si512(pick[0]), odds = _mm512_load_si512(pick[1]);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = 0; b * kLaneBlock < k; ++b) {
    alignas(64) int8_t halves[2][256] = {};  // even and odd columns, group-major
    for (int64_t g = 0; g < 16; ++g) {
      const int64_t j = b * kLaneBlock + 32 * g;
      if (j >= k) {
        scales[b * 16 + g] = 0.0f;
        continue;
      }
      __m512 lo = _mm512_loadu_ps(x + j), hi = _mm512_loadu_ps(x + j + 16);
      float top = std::max(_mm512_reduce_max_ps(_mm512_abs_ps(lo)),
                           _mm512_reduce_max_ps(_mm512_abs_ps(hi)));
      scales[b * 16 + g] = top / 127.0f;
      __m512 inv = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      for (int h = 0; h < 2; ++h) {  // rounded to nearest even, within +-127
        __m512 v = _mm512_permutex2var_ps(lo, h ? odds : evens, hi);
        __m128i c = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));
        _mm_store_si128(reinterpret_cast<__m128i*>(halves[h] + 16 * g), c);
      }
    }
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      __m512i z[4], d[4];
      load_groups(reinterpret_cast<const uint8_t*>(halves[h]), 256, z);
      group_words(z, d);
      for (int u = 0; u < 4; ++u) {
        _mm512_storeu_si512(codes + (b * 8 + 2 * u + h) * 64, d[u]);
        sum = _mm512_dpbusd_epi32(sum, ones, d[u]);
      }
    }
    _mm512_storeu_si512(starts + b * 16, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-8)));
  }
}

// y[i, r] for RB widened weight rows (w[r], from row r0 on) and MX rows of x from i0.
template <int RB, int MX>
SLIMLLM_AVX512_BF16 void lanes_tile(const Problem& p, const LaneX& xl, const uint8_t* const* w,
                                    int64_t r0, int64_t i0, const uint8_t* ahead, int64_t lines) {
  // the float sums wait in memory between blocks: with the int32 sums, 32 vectors would not
  // fit the registers (the compiler's own spills and copies took 2x the time)
  alignas(64) float acc[MX * RB][16];
  for (auto& a : acc) _mm512_store_ps(a, _mm512_setzero_ps());
  // pointers stepped per block: with the offsets computed from i0, b and v in the loop, GCC
  // kept them on the stack and spent ~2 scalar instructions per load (5% slower, 16 and 128 rows)
  const int8_t* xc = xl.codes + i0 * xl.blocks * 8 * 64;  // row i0's codes; row i0 + i's after
  const int64_t x_row = xl.blocks * 8 * 64;
  for (int64_t b = 0, line = 0; b < xl.blocks; ++b, xc += 8 * 64) {
    __m512i sum[MX * RB];
    for (int i = 0; i < MX; ++i) {
      __m512i start = _mm512_loadu_si512(xl.starts + ((i0 + i) * xl.blocks + b) * 16);
      for (int r = 0; r < RB; ++r) sum[i * RB + r] = start;
    }
    for (int64_t t = 0; t < 8 && line < lines; ++t, ++line)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * line), _MM_HINT_T0);
    const uint8_t* wb[RB];
    for (int r = 0; r < RB; ++r) wb[r] = w[r] + b * 8 * 64;
#pragma GCC unroll 8
    for (int64_t v = 0; v < 8; ++v) {
      __m512i wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = _mm512_load_si512(wb[r] + v * 64);
      for (int i = 0; i < MX; ++i) {
        __m512i xv = _mm512_loadu_si512(xc + i * x_row + v * 64);
        for (int r = 0; r < RB; ++r)
          sum[i * RB + r] = _mm512_dpbusd_epi32(sum[i * RB + r], wv[r], xv);
      }
    }
    const __mmask16 groups = __mmask16((1u << std::min<int64_t>(16, p.groups - 16 * b)) - 1);
    for (int r = 0; r < RB; ++r) {
      __m512 ws = scales_16<kInt4>(p, r0 + r, 16 * b, groups);
      for (int i = 0; i < MX; ++i) {
        __m512 xs = _mm512_loadu_ps(xl.scales + ((i0 + i) * xl.blocks + b) * 16);
        __m512 sums = _mm512_cvtepi32_ps(sum[i * RB + r]);
        _mm512_store_ps(acc[i * RB + r], _mm512_fmadd_ps(sums, _mm512_mul_ps(ws, xs),
                                                         _mm512_load_ps(acc[i * RB + r])));
      }
    }
  }
  float* y = p.y + i0 * p.n + r0;
  if constexpr (MX * RB == 16 && RB == 4) {
    __m512 v[16];
    for (int t = 0; t < 16; ++t) v[t] = _mm512_load_ps(acc[t]);
    alignas(64) float sums[16];
    _mm512_store_ps(sums, lane_sums(v));
    for (int i = 0; i < MX; ++i) _mm_storeu_ps(y + i * p.n, _mm_load_ps(sums + 4 * i));
  } else {
    for (int i = 0; i < MX; ++i)
      for (int r = 0; r < RB; ++r)
        y[i * p.n + r] = _mm512_reduce_add_ps(_mm512_load_ps(acc[i * RB + r]));
  }
}

// Every row of x against RB weight rows from r0: widened once, then a pass per kTileX rows of
// x, the passes asking for the stored rows two tiles on (one row a pass, as pairs_rows).
template <int RB>
SLIMLLM_AVX512_BF16 void lanes_rows(const Problem& p, const LaneX& xl, int64_t r0) {
  const int64_t wide = xl.blocks * kLaneBlock;  // bytes of a widened row
  uint8_t* buffer = item_buffer(RB * wide);
  const uint8_t* w[RB];
  for (int r = 0; r < RB; ++r) {
    widen_row_lanes(p.w + (r0 + r) * p.row_bytes, p.k, buffer + r * wide);
    w[r] = buffer + r * wide;
  }
  const uint8_t* next = p.w + (r0 + 2 * kTileRows) * p.row_bytes;
  const bool whole = RB == kTileRows;  // a lone row asks for nothing
  passes(p, next, whole ? RB : 0, p.row_bytes, whole ? (p.row_bytes + 63) / 64 : 0,
         [&](auto mx, int64_t i, const uint8_t* asked, int64_t lines) SLIMLLM_AVX512_BF16 {
           lanes_tile<RB, decltype(mx)::value>(p, xl, w, r0, i, asked, lines);
         });
}

void run_lanes(ffi::ThreadPool& pool, const Problem& p) {
  const int64_t blocks = (p.k + kLaneBlock - 1) / kLaneBlock;
  Aligned<int8_t> codes(p.m * blocks * kLaneBlock);
  std::vector<float> scales(p.m * blocks * 16);
  std::vector<int32_t> starts(p.m * blocks * 16);
  for (int64_t i = 0; i < p.m; ++i)
    round_row_lanes(p.x + i * p.k, p.k, codes.data() + i * blocks * kLaneBlock,
                    scales.data() + i * blocks * 16, starts.data() + i * blocks * 16);
  const LaneX xl{codes.data(), scales.data(), starts.data(), blocks};
  int64_t chunks = (p.n + kChunkRows - 1) / kChunkRows;
  parallel_for(pool, chunks, [&](int64_t c) {
    int64_t r = c * kChunkRows, r1 = std::min(p.n, r + kChunkRows);
    for (; r + kTileRows <= r1; r += kTileRows) lanes_rows<kTileRows>(p, xl, r);
    for (; r < r1; ++r) lanes_rows<1>(p, xl, r);
  }, p.m <= kStayRows);
}

#endif  // SLIMLLM_X86

// x rounded to 16-bit integers, one scale per row (max|x| / 32767; 0 for a zero row).
void round_x(const float* x, int64_t m, int64_t k, int16_t* xq, float* xs) {
  for (int64_t i = 0; i < m; ++i) {
    float top = 0.0f;
    for (int64_t j = 0; j < k; ++j) top = std::max(top, std::fabs(x[i * k + j]));
    xs[i] = top / 32767.0f;
    float inv = top > 0.0f ? 32767.0f / top : 0.0f;
    for (int64_t j = 0; j < k; ++j) xq[i * k + j] = int16_t(std::nearbyint(x[i * k + j] * inv));
  }
}

template <int E>
void run(ffi::ThreadPool& pool, Problem p, bool allow_integer) {
  bool fast = SLIMLLM_X86 && has_avx512() && p.k % 16 == 0 && p.group % 16 == 0;
#if SLIMLLM_X86
  if (p.pairs) return run_columns(pool, p);  // bfloat16, checked by `linear`
  if (allow_integer && fast && has_amx() && p.m > kTileX && (E == kBFloat16 || scaled(E)) &&
      p.k % kAmxCols == 0 && p.group % kAmxCols == 0 && p.n % kAmxRows == 0)
    return run_amx<E>(pool, p);
  if (allow_integer && fast && has_avx512_bf16() && p.m > kTileX && (E == kBFloat16 || scaled(E)) &&
      p.k % kPairCols == 0 && p.group % kPairCols == 0) {
    if (E == kInt8 && p.group % kQuadCols == 0) return run_quads(pool, p);
    if (E == kInt4 && p.group == 32) return run_lanes(pool, p);
    if (E == kBFloat16 && p.m >= kColumnsMinX) return run_columns(pool, p);
    return run_pairs<E>(pool, p);
  }
#endif
  // the integer road needs whole 32-column steps and groups that fit an int32 sum
  bool integer = allow_integer && fast && scaled(E) && has_avx512_vnni() && p.k % 32 == 0 && p.group % 32 == 0 &&
                 (p.groups == 1 || p.group <= 4 * kIntBlock);
  bool bytes = integer && E == kInt4 && int4_bytes_fit(p);  // "int4 bytes" below
  std::vector<int8_t> x_even(bytes ? p.m * p.k / 2 : 0), x_odd(x_even.size());
  std::vector<int32_t> x_bias(bytes ? p.m * p.k / 8 : 0);
  std::vector<float> x_lanes(x_bias.size());
  if (bytes) {
    round_x_bytes(p, x_even.data(), x_odd.data(), x_bias.data(), x_lanes.data());
    p.x_even = x_even.data();
    p.x_odd = x_odd.data();
    p.x_bias = x_bias.data();
    p.x_lanes = x_lanes.data();
    integer = false;
  }
  std::vector<int16_t> xq(integer ? p.m * p.k : 0);
  std::vector<float> xs(integer ? p.m : 0);
  if (integer) {
    round_x(p.x, p.m, p.k, xq.data(), xs.data());
    p.xq = xq.data();
    p.xs = xs.data();
  }
  // A thread's streams through memory break where its work item ends (rows one after another,
  // or a tile's four rows a quarter of the item apart): items of n / (4 * threads) rows (an
  // eighth of the matrix on 2 cores) read longer streams than 64 rows did. The 156M model's
  // matrices and LM head, two libraries in one process, min / median ms: one row of x bfloat16
  // 7.98 / 8.81 -> 7.80 / 8.48, int8 3.59 / 4.33 -> 3.41 / 3.98, int4 (tiles) 2.86 / 2.99 ->
  // 2.43 / 2.59; four rows int4 6.52 / 7.02 -> 5.92 / 6.36, int8 5.43 / 5.95 -> 5.01 / 5.35,
  // bfloat16 9.49 / 10.41 -> 9.10 / 10.08.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = std::max(kChunkRows, (p.n / (4 * threads) + 15) / 16 * 16);
  int64_t chunks = (p.n + rows - 1) / rows;
  parallel_for(pool, chunks, [&](int64_t c) {
    int64_t r0 = c * rows, r1 = std::min(p.n, r0 + rows);
#if SLIMLLM_X86
    if (fast) return rows_avx512<E>(p, r0, r1);
#endif
    rows_portable<E>(p, r0, r1);
  }, p.m <= kStayRows);
}

const ffi::DataType kStorage[] = {ffi::F32, ffi::F16, ffi::U16, ffi::S8, ffi::U8};
const int64_t kPerByte[] = {0, 0, 0, 1, 2};  // values per byte (0: bytes per value follow dtype)

using Matrix = ffi::Buffer<ffi::F32, 2>;
using MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

ffi::Error linear(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer w, ffi::AnyBuffer scale,
                  MatrixResult y, int32_t encoding, int32_t integer, int32_t pairs) {
  if (encoding < kFloat32 || encoding > kInt4)
    return ffi::Error::InvalidArgument("slimllm_linear: unknown encoding");
  if (w.element_type() != kStorage[encoding] || w.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("slimllm_linear: weight dtype or rank does not match");
  // int4's scales are float16, every other encoding's float32 (unread where unscaled)
  const ffi::DataType scale_type = encoding == kInt4 ? ffi::F16 : ffi::F32;
  if (scale.element_type() != scale_type || scale.dimensions().size() != 2)
    return ffi::Error::InvalidArgument(
        "slimllm_linear: scales must be 2-d, float16 for int4 and float32 otherwise");
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  int64_t m = xd[0], k = xd[1], n = pairs ? 16 * wd[0] : wd[0];
  int64_t stored = pairs ? 16 * k : kPerByte[encoding] ? k / kPerByte[encoding] : k;
  if (wd[1] != stored || yd[0] != m || yd[1] != n)
    return ffi::Error::InvalidArgument("slimllm_linear: shapes do not match");
  // weights in pair order: only the columns road reads them
  if (pairs && (encoding != kBFloat16 || !integer || !SLIMLLM_X86 || !has_avx512_bf16() ||
                k % kPairCols))
    return ffi::Error::InvalidArgument(
        "slimllm_linear: weights in pair order need bfloat16, kernels \"fast\", AVX512-BF16 "
        "and columns in steps of 32");
  int64_t groups = scaled(encoding) ? sd[1] : 1;
  if (scaled(encoding) && (sd[0] != n || groups < 1 || k % groups))
    return ffi::Error::InvalidArgument("slimllm_linear: scale shape does not match");
  Problem p{x.typed_data(),
            static_cast<const uint8_t*>(w.untyped_data()),
            encoding == kInt4 ? nullptr : static_cast<const float*>(scale.untyped_data()),
            y->typed_data(),
            m,
            n,
            k,
            static_cast<int64_t>(w.size_bytes() / std::max<int64_t>(n, 1)),
            groups,
            k / groups,
            nullptr,
            pairs != 0};
  if (encoding == kInt4) p.half_scale = static_cast<const uint16_t*>(scale.untyped_data());
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(p.y, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  switch (encoding) {
    case kFloat32: run<kFloat32>(pool, p, false); break;
    case kFloat16: run<kFloat16>(pool, p, false); break;
    case kBFloat16: run<kBFloat16>(pool, p, integer != 0); break;
    case kInt8: run<kInt8>(pool, p, integer != 0); break;
    default: run<kInt4>(pool, p, integer != 0); break;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace slimllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(slimllm_linear, slimllm::linear,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<slimllm::Matrix>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<slimllm::Matrix>()
                                  .Attr<int32_t>("encoding")
                                  .Attr<int32_t>("integer")
                                  .Attr<int32_t>("pairs"));
