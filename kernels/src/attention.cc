// SlimAttention (PAPER.md section 2; the reference's slim_attention.py): exact attention of
// query rows against the cache's key slots they can see, out = softmax(q kᵀ · scale + bias) · v.
//
// Prefill splits the query rows of each (batch, head) into blocks; a block computes its complete
// score rows against the keys its rows can see, an exact softmax per row (max, exp, sum; no
// running statistics), then P @ V. Work items are (batch, head, block), claimed by the threads of
// XLA's pool. A row sees the key columns whose bias is finite; its columns before the first and
// after the last such one are never multiplied (causal prefill does about half the work), so the
// result is the definition's for any bias (causal, ALiBi, prefix-LM, rows that see nothing).
// Keys are packed per thread into panels of kPanel columns, [d][kPanel] each, widened to
// float32 (int8 times its scale: the definition's dequantised value), once per kv head; the
// register tiles multiply rows of q by a panel and rows of P by rows of V.
//
// Decode (a few query rows) is memory-bound: each (batch, kv head) reads its keys once, split
// into chunks so that every thread has work at batch 1; a chunk keeps its row max m_c, sum l_c
// and unnormalised output o_c, merged exactly: out = sum_c o_c e^(m_c - m) / sum_c l_c
// e^(m_c - m), m = max_c m_c (the reference's split_keys_decode).
//
// Naive attention (the definition: every score row complete, one exact softmax) is the same
// kernel with one block of all the query rows and one key chunk: `block` = t, `chunks` = 1.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace slimllm {
namespace {

// The cache's storage formats the kernel reads, numbered as kernels/attention.py numbers them.
enum Storage : int32_t { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };

constexpr int64_t kPanel = 32;  // key columns per packed panel (two AVX-512 vectors)
constexpr int64_t kScoreRows = 12;  // query rows per score register tile
constexpr int64_t kOutRows = 6;  // query rows per P @ V register tile
constexpr int64_t kOutCols = 64;  // output columns per P @ V register tile
constexpr int64_t kDecodeRows = 4;  // query positions up to which the decode path is taken
constexpr int64_t kMinChunk = 128;  // fewest keys per decode chunk
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  const float* q;  // [b, t, h, d]
  const uint8_t* k;  // [b, kh, s, d] stored
  const uint8_t* v;
  const float* k_scale;  // [b, kh, s] (int8)
  const float* v_scale;
  const float* bias;  // [b, hb, t, s], hb = 1 or h
  float* out;  // [b, t, h, d]
  int64_t b, t, h, kh, s, d, hb;
  float scale;
  int32_t storage;
  int64_t block;  // query rows per block (prefill)
  int64_t chunks;  // most key chunks per (batch, kv head) in decode; 0: as the threads need
  bool fast;  // the AVX-512 path

  int64_t group() const { return h / kh; }
  const float* q_row(int64_t bi, int64_t i, int64_t head) const {
    return q + ((bi * t + i) * h + head) * d;
  }
  float* out_row(int64_t bi, int64_t i, int64_t head) const {
    return out + ((bi * t + i) * h + head) * d;
  }
  const float* bias_row(int64_t bi, int64_t i, int64_t head) const {
    return bias + ((bi * hb + (hb == 1 ? 0 : head)) * t + i) * s;
  }
};

// Stored row `row` ((bi kh + kvh) s + j) of K or V as float32 (the stored value times its scale).
void widen_row_portable(const Problem& p, const uint8_t* base, const float* scales, int64_t row,
                        float* dst) {
  if (p.storage == kFloat32) {
    std::memcpy(dst, base + row * p.d * 4, p.d * 4);
  } else if (p.storage == kBFloat16) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(base) + row * p.d;
    for (int64_t c = 0; c < p.d; ++c) {
      uint32_t bits = uint32_t(src[c]) << 16;
      std::memcpy(dst + c, &bits, 4);
    }
  } else {
    const int8_t* src = reinterpret_cast<const int8_t*>(base) + row * p.d;
    float scale = scales[row];
    for (int64_t c = 0; c < p.d; ++c) dst[c] = float(src[c]) * scale;
  }
}

// The float32 rows [0, s) of a float32 cache's kv head, read in place.
const float* wide_rows(const Problem& p, const uint8_t* base, int64_t bi, int64_t kvh) {
  return reinterpret_cast<const float*>(base) + (bi * p.kh + kvh) * p.s * p.d;
}

// [lo, hi): from the first to one past the last column a bias row leaves finite (0, 0 if none).
void extent(const float* bias, int64_t s, int64_t& lo, int64_t& hi) {
  lo = 0;
  while (lo < s && std::isinf(bias[lo]) && bias[lo] < 0) ++lo;
  hi = s;
  while (hi > lo && std::isinf(bias[hi - 1]) && bias[hi - 1] < 0) --hi;
  if (lo == hi) lo = hi = 0;
}

float safe_max(float m) { return std::isfinite(m) ? m : 0.0f; }  // the reference's m_safe

// ---------------------------------------------------------------- AVX-512 pieces

#if SLIMLLM_X86

// e^x to about one ulp, and exactly 0 for x = -inf: x = n ln2 + r, |r| <= ln2 / 2, e^r by its
// Taylor polynomial of degree 7, times 2^n.
SLIMLLM_AVX512 inline __m512 exp16(__m512 x) {
  __mmask16 gone = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);  // ln2, the rest
  __m512 e = _mm512_set1_ps(1.0f / 5040);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 720));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(~gone, _mm512_scalef_ps(e, n));
}

SLIMLLM_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// Which of bias columns j .. j + n (n <= 16) some query sees: lanes that are not -inf.
SLIMLLM_AVX512 inline __mmask16 seen16(const float* bias, int64_t j, int64_t n) {
  __mmask16 m = lanes(n);
  return _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, bias + j), _mm512_set1_ps(kNegInf),
                                 _CMP_NEQ_UQ);  // NaN is seen, as in extent()
}

// extent() sixteen columns at a time.
SLIMLLM_AVX512 void extent_avx512(const float* bias, int64_t s, int64_t& lo, int64_t& hi) {
  lo = hi = 0;
  int64_t a = 0;
  for (; a < s; a += 16)
    if (__mmask16 m = seen16(bias, a, std::min<int64_t>(16, s - a))) {
      a += __builtin_ctz(m);
      break;
    }
  if (a >= s) return;
  for (int64_t z = s; z > a; z -= 16) {
    int64_t j = std::max(a, z - 16);
    if (__mmask16 m = seen16(bias, j, z - j)) {
      lo = a, hi = j + 32 - __builtin_clz(uint32_t(m));
      return;
    }
  }
}

// Scores of R packed query rows (qb, [R][d]) against one key panel ([d][kPanel]) into
// s[r][0, kPanel), row stride ss.
template <int R>
SLIMLLM_AVX512 void score_tile(const float* qb, const float* panel, int64_t d, float* s,
                               int64_t ss) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m512 k0 = _mm512_loadu_ps(panel + c * kPanel), k1 = _mm512_loadu_ps(panel + c * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      __m512 qv = _mm512_set1_ps(qb[r * d + c]);
      acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s + r * ss, acc[r][0]);
    _mm512_storeu_ps(s + r * ss + 16, acc[r][1]);
  }
}

// out[r][c0, c0 + 16 NV) = sum_{j in [a, z)} P[r][j] V[j][c0, ...] / l[r] for R rows.
template <int R, int NV>
SLIMLLM_AVX512 void out_tile(const float* prob, int64_t ss, const float* v, int64_t d, int64_t a,
                             int64_t z, int64_t c0, const float* l, float* const* out) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t j = a; j < z; ++j) {
    __m512 vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = _mm512_loadu_ps(v + j * d + c0 + 16 * n);
    for (int r = 0; r < R; ++r) {
      __m512 pv = _mm512_set1_ps(prob[r * ss + j]);
      for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_fmadd_ps(pv, vv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 total = _mm512_set1_ps(l[r] > 0 ? l[r] : 1.0f);
    for (int n = 0; n < NV; ++n)
      _mm512_storeu_ps(out[r] + c0 + 16 * n, _mm512_div_ps(acc[r][n], total));
  }
}

template <int R>
SLIMLLM_AVX512 void out_rows_avx512(const float* prob, int64_t ss, const float* v, int64_t d,
                                    int64_t a, int64_t z, const float* l, float* const* out) {
  int64_t c0 = 0;
  for (; c0 + kOutCols <= d; c0 += kOutCols) out_tile<R, 4>(prob, ss, v, d, a, z, c0, l, out);
  for (; c0 < d; c0 += 16) out_tile<R, 1>(prob, ss, v, d, a, z, c0, l, out);
}

// Row x[lo, hi) <- scores * scale + bias, then e^(x - max); returns the sum.
SLIMLLM_AVX512 float softmax_row_avx512(float* x, const float* bias, int64_t lo, int64_t hi,
                                        float scale, float* top_out) {
  __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(kNegInf);
  for (int64_t j = lo; j < hi; j += 16) {
    __mmask16 m = lanes(hi - j);
    __m512 b = _mm512_maskz_loadu_ps(m, bias + j);
    __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + j), vs, b);
    vm = _mm512_mask_max_ps(vm, m, vm, v);
    _mm512_mask_storeu_ps(x + j, m, v);
  }
  *top_out = _mm512_reduce_max_ps(vm);
  __m512 top = _mm512_set1_ps(safe_max(*top_out)), sum = _mm512_setzero_ps();
  for (int64_t j = lo; j < hi; j += 16) {
    __mmask16 m = lanes(hi - j);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), top));
    sum = _mm512_mask_add_ps(sum, m, sum, e);
    _mm512_mask_storeu_ps(x + j, m, e);
  }
  return _mm512_reduce_add_ps(sum);
}

SLIMLLM_AVX512 void widen_row_avx512(const Problem& p, const uint8_t* base, const float* scales,
                                     int64_t row, float* dst) {
  if (p.storage == kFloat32) {
    std::memcpy(dst, base + row * p.d * 4, p.d * 4);
  } else if (p.storage == kBFloat16) {
    const uint8_t* src = base + row * p.d * 2;
    for (int64_t c = 0; c < p.d; c += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * c));
      __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);  // bf16: high half
      _mm512_storeu_ps(dst + c, _mm512_castsi512_ps(bits));
    }
  } else {
    const uint8_t* src = base + row * p.d;
    __m512 scale = _mm512_set1_ps(scales[row]);
    for (int64_t c = 0; c < p.d; c += 16) {
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
      _mm512_storeu_ps(dst + c, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale));
    }
  }
}

SLIMLLM_AVX512 float dot_avx512(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
  return _mm512_reduce_add_ps(acc);
}

SLIMLLM_AVX512 void axpy_avx512(float a, const float* x, float* y, int64_t d) {
  __m512 va = _mm512_set1_ps(a);
  for (int64_t c = 0; c < d; c += 16)
    _mm512_storeu_ps(y + c, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + c), _mm512_loadu_ps(y + c)));
}

// Lane i of the result: the sum of v[i]'s 16 lanes (pairs, then quads, then 128-bit lanes).
SLIMLLM_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 w[8], u[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Sixteen values of a stored row from column c, as float32: float32 as is, bfloat16 widened,
// int8 codes unscaled (the callers apply the row's scale once per dot product or per weight).
template <int S>
SLIMLLM_AVX512 inline __m512 load16(const uint8_t* row, int64_t c) {
  if constexpr (S == kFloat32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + c);
  } else if constexpr (S == kBFloat16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * c));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  }
}

constexpr int64_t kStoredBytes[] = {4, 2, 1};  // per value, by Storage

// Decode's scores for R rows (head of the group, position) from r0 of kv head (bi, kvh) against
// keys [j0, j1), read as stored (S) with d = 16 C: x[r * n + j - j0] = q_r . k_j, 0 where the
// bias hides the key. K = 16 / R keys at a time, each read (and widened) once for the R rows:
// one partial vector per (row, key), the 16 summed across in one pass, lane r K + kk holding
// row r's score of key j + kk. int8 keys' dot products are scaled once each (q . (c s) =
// (q . c) s, to rounding).
template <int C, int S, int R>
SLIMLLM_AVX512 void decode_score_rows(const Problem& p, int64_t bi, int64_t kvh, int64_t r0,
                                      int64_t j0, int64_t j1, float* x) {
  constexpr int K = 16 / R;
  const int64_t n = j1 - j0, g = p.group(), row_bytes = 16 * C * kStoredBytes[S];
  const int64_t first = (bi * p.kh + kvh) * p.s;  // the kv head's slot 0
  const uint8_t* keys = p.k + first * row_bytes;
  const float* q[R];
  const float* bias[R];
  for (int r = 0; r < R; ++r) {
    int64_t head = kvh * g + (r0 + r) / p.t, i = (r0 + r) % p.t;
    q[r] = p.q_row(bi, i, head), bias[r] = p.bias_row(bi, i, head);
  }
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j = j0; j < j1; j += K) {
    const int64_t m = std::min<int64_t>(K, j1 - j);
    __m512 acc[16];
    for (int kk = 0; kk < K; ++kk) {
      const uint8_t* key = keys + (j + std::min<int64_t>(kk, m - 1)) * row_bytes;
      __m512 kv[C];
      for (int c = 0; c < C; ++c) kv[c] = load16<S>(key, 16 * c);
      for (int r = 0; r < R; ++r) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q[r]), kv[0]);
        for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(q[r] + 16 * c), kv[c], a);
        acc[r * K + kk] = a;
      }
    }
    __m512 sums = sum16(acc);
    const __mmask16 live = lanes(m);
    if constexpr (S == kInt8) {  // the K keys' scales, once per row's lanes
      __m512 sc = _mm512_maskz_loadu_ps(live, p.k_scale + first + j);
      if constexpr (K == 4) sc = _mm512_broadcast_f32x4(_mm512_castps512_ps128(sc));
      if constexpr (K == 8) sc = _mm512_broadcast_f32x8(_mm512_castps512_ps256(sc));
      sums = _mm512_mul_ps(sums, sc);
    }
    for (int r = 0; r < R; ++r) {
      __m512 b = _mm512_maskz_loadu_ps(live, bias[r] + j);
      __mmask16 hidden = _mm512_cmp_ps_mask(b, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ);
      __m512 mine = sums;  // row r's lanes r K .. r K + K, moved to lanes 0 .. K
      if constexpr (R > 1)
        mine = _mm512_permutexvar_ps(_mm512_add_epi32(iota, _mm512_set1_epi32(r * K)), sums);
      _mm512_mask_storeu_ps(x + (r0 + r) * n + j - j0, live, _mm512_maskz_mov_ps(~hidden, mine));
    }
  }
}

// All the rows' scores: four rows at a time (four keys each pass), then two, then one.
template <int C, int S>
SLIMLLM_AVX512 void decode_scores_avx512(const Problem& p, int64_t bi, int64_t kvh, int64_t rows,
                                         int64_t j0, int64_t j1, float* x) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) decode_score_rows<C, S, 4>(p, bi, kvh, r, j0, j1, x);
  if (r + 2 <= rows) decode_score_rows<C, S, 2>(p, bi, kvh, r, j0, j1, x), r += 2;
  if (r < rows) decode_score_rows<C, S, 1>(p, bi, kvh, r, j0, j1, x);
}

// Decode's outputs: o_r = sum_j x[r][j] v_j over values [j0, j1) (read as stored, S) into
// part + r * stride + 2, RB rows at a time with their d = 16 C columns in registers; an int8
// value's scale goes into its weight (x[r][j] (c s) = (x[r][j] s) c, to rounding).
template <int C, int RB, int S>
SLIMLLM_AVX512 void decode_values_avx512(const Problem& p, int64_t bi, int64_t kvh, int64_t rows,
                                         int64_t j0, int64_t j1, const float* x, float* part,
                                         int64_t stride) {
  const int64_t n = j1 - j0, row_bytes = 16 * C * kStoredBytes[S];
  const int64_t first = (bi * p.kh + kvh) * p.s;
  for (int64_t r0 = 0; r0 < rows; r0 += RB) {
    __m512 o[RB][C];
    for (int k = 0; k < RB; ++k)
      for (int c = 0; c < C; ++c) o[k][c] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* value = p.v + (first + j) * row_bytes;
      __m512 vv[C];
      for (int c = 0; c < C; ++c) vv[c] = load16<S>(value, 16 * c);
      float scale = S == kInt8 ? p.v_scale[first + j] : 1.0f;
      for (int k = 0; k < RB; ++k) {
        float weight = r0 + k < rows ? x[(r0 + k) * n + j - j0] : 0.0f;
        __m512 w = _mm512_set1_ps(S == kInt8 ? weight * scale : weight);
        for (int c = 0; c < C; ++c) o[k][c] = _mm512_fmadd_ps(w, vv[c], o[k][c]);
      }
    }
    for (int k = 0; k < RB && r0 + k < rows; ++k)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(part + (r0 + k) * stride + 2 + 16 * c, o[k][c]);
  }
}

// Scores and outputs for a cache as stored (S) with any d that is a multiple of 16, up to 128
// (else false: the caller's loops).
template <int S>
SLIMLLM_AVX512 bool decode_scores_stored(const Problem& p, int64_t bi, int64_t kvh, int64_t rows,
                                         int64_t j0, int64_t j1, float* x) {
  switch (p.d % 16 ? 0 : p.d / 16) {
#define SLIMLLM_SCORES(C)                                          \
  case C:                                                          \
    decode_scores_avx512<C, S>(p, bi, kvh, rows, j0, j1, x);       \
    return true;
    SLIMLLM_SCORES(1)
    SLIMLLM_SCORES(2)
    SLIMLLM_SCORES(3)
    SLIMLLM_SCORES(4)
    SLIMLLM_SCORES(5)
    SLIMLLM_SCORES(6)
    SLIMLLM_SCORES(7)
    SLIMLLM_SCORES(8)
#undef SLIMLLM_SCORES
    default:
      return false;
  }
}

template <int S>
SLIMLLM_AVX512 bool decode_values_stored(const Problem& p, int64_t bi, int64_t kvh, int64_t rows,
                                         int64_t j0, int64_t j1, const float* x, float* part,
                                         int64_t stride) {
  switch (p.d % 16 ? 0 : p.d / 16) {
#define SLIMLLM_VALUES(C, RB)                                                   \
  case C:                                                                       \
    decode_values_avx512<C, RB, S>(p, bi, kvh, rows, j0, j1, x, part, stride);  \
    return true;
    SLIMLLM_VALUES(1, 4)
    SLIMLLM_VALUES(2, 4)
    SLIMLLM_VALUES(3, 4)
    SLIMLLM_VALUES(4, 4)
    SLIMLLM_VALUES(5, 2)
    SLIMLLM_VALUES(6, 2)
    SLIMLLM_VALUES(7, 2)
    SLIMLLM_VALUES(8, 2)
#undef SLIMLLM_VALUES
    default:
      return false;
  }
}

SLIMLLM_AVX512 bool decode_scores_fast(const Problem& p, int64_t bi, int64_t kvh, int64_t rows,
                                       int64_t j0, int64_t j1, float* x) {
  if (p.storage == kFloat32) return decode_scores_stored<kFloat32>(p, bi, kvh, rows, j0, j1, x);
  if (p.storage == kBFloat16) return decode_scores_stored<kBFloat16>(p, bi, kvh, rows, j0, j1, x);
  return decode_scores_stored<kInt8>(p, bi, kvh, rows, j0, j1, x);
}

SLIMLLM_AVX512 bool decode_values_fast(const Problem& p, int64_t bi, int64_t kvh, int64_t rows,
                                       int64_t j0, int64_t j1, const float* x, float* part,
                                       int64_t stride) {
  if (p.storage == kFloat32)
    return decode_values_stored<kFloat32>(p, bi, kvh, rows, j0, j1, x, part, stride);
  if (p.storage == kBFloat16)
    return decode_values_stored<kBFloat16>(p, bi, kvh, rows, j0, j1, x, part, stride);
  return decode_values_stored<kInt8>(p, bi, kvh, rows, j0, j1, x, part, stride);
}

#endif  // SLIMLLM_X86

// ---------------------------------------------------------------- portable pieces

void score_tile_portable(const float* qb, int64_t rows, const float* panel, int64_t d, float* s,
                         int64_t ss) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    for (int64_t c = 0; c < d; ++c) {
      float qv = qb[r * d + c];
      for (int64_t j = 0; j < kPanel; ++j) acc[j] += qv * panel[c * kPanel + j];
    }
    std::memcpy(s + r * ss, acc, sizeof(acc));
  }
}

void out_rows_portable(const float* prob, int64_t ss, int64_t rows, const float* v, int64_t d,
                       int64_t a, int64_t z, const float* l, float* const* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out[r];
    std::fill(o, o + d, 0.0f);
    for (int64_t j = a; j < z; ++j) {
      float pj = prob[r * ss + j];
      for (int64_t c = 0; c < d; ++c) o[c] += pj * v[j * d + c];
    }
    float total = l[r] > 0 ? l[r] : 1.0f;
    for (int64_t c = 0; c < d; ++c) o[c] /= total;
  }
}

float softmax_row_portable(float* x, const float* bias, int64_t lo, int64_t hi, float scale,
                           float* top_out) {
  float top = kNegInf;
  for (int64_t j = lo; j < hi; ++j) {
    x[j] = x[j] * scale + bias[j];
    top = std::max(top, x[j]);
  }
  *top_out = top;
  top = safe_max(top);
  float sum = 0;
  for (int64_t j = lo; j < hi; ++j) sum += (x[j] = std::exp(x[j] - top));
  return sum;
}

float dot_portable(const float* a, const float* b, int64_t d) {
  float acc = 0;
  for (int64_t c = 0; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

void axpy_portable(float a, const float* x, float* y, int64_t d) {
  for (int64_t c = 0; c < d; ++c) y[c] += a * x[c];
}

// ---------------------------------------------------------------- dispatch

// Row x[lo, hi) <- e^(x scale + bias - max) (a max of -inf counts as 0, as in the reference);
// returns the row's sum, and its max in *top.
float softmax_row(const Problem& p, float* x, const float* bias, int64_t lo, int64_t hi,
                  float* top) {
#if SLIMLLM_X86
  if (p.fast) return softmax_row_avx512(x, bias, lo, hi, p.scale, top);
#endif
  return softmax_row_portable(x, bias, lo, hi, p.scale, top);
}

// Row j of kv head (bi, kvh) of K or V as float32 (the stored value times its scale).
void widen_row(const Problem& p, const uint8_t* base, const float* scales, int64_t bi,
               int64_t kvh, int64_t j, float* dst) {
  int64_t row = (bi * p.kh + kvh) * p.s + j;
#if SLIMLLM_X86
  if (p.fast) return widen_row_avx512(p, base, scales, row, dst);
#endif
  widen_row_portable(p, base, scales, row, dst);
}

void extent(const Problem& p, const float* bias, int64_t& lo, int64_t& hi) {
#if SLIMLLM_X86
  if (p.fast) return extent_avx512(bias, p.s, lo, hi);
#endif
  extent(bias, p.s, lo, hi);
}

float dot(const Problem& p, const float* a, const float* b) {
#if SLIMLLM_X86
  if (p.fast) return dot_avx512(a, b, p.d);
#endif
  return dot_portable(a, b, p.d);
}

void axpy(const Problem& p, float a, const float* x, float* y) {
#if SLIMLLM_X86
  if (p.fast) return axpy_avx512(a, x, y, p.d);
#endif
  axpy_portable(a, x, y, p.d);
}

// Score rows [r0, r0 + rows) of a block against panels [p0, p1).
void score_rows(const Problem& p, const float* qb, int64_t rows, const float* kt, int64_t p0,
                int64_t p1, float* s, int64_t ss) {
  for (int64_t pi = p0; pi < p1; ++pi) {
    const float* panel = kt + pi * p.d * kPanel;
    float* dst = s + pi * kPanel;
#if SLIMLLM_X86
    if (p.fast) {
      switch (rows) {
        case kScoreRows: score_tile<kScoreRows>(qb, panel, p.d, dst, ss); continue;
        case 8: score_tile<8>(qb, panel, p.d, dst, ss); continue;
        case 4: score_tile<4>(qb, panel, p.d, dst, ss); continue;
        case 2: score_tile<2>(qb, panel, p.d, dst, ss); continue;
        case 1: score_tile<1>(qb, panel, p.d, dst, ss); continue;
        default: break;
      }
    }
#endif
    score_tile_portable(qb, rows, panel, p.d, dst, ss);
  }
}

void out_rows(const Problem& p, const float* prob, int64_t ss, int64_t rows, const float* v,
              int64_t a, int64_t z, const float* l, float* const* out) {
#if SLIMLLM_X86
  if (p.fast) {
    switch (rows) {
      case kOutRows: return out_rows_avx512<kOutRows>(prob, ss, v, p.d, a, z, l, out);
      case 4: return out_rows_avx512<4>(prob, ss, v, p.d, a, z, l, out);
      case 2: return out_rows_avx512<2>(prob, ss, v, p.d, a, z, l, out);
      case 1: return out_rows_avx512<1>(prob, ss, v, p.d, a, z, l, out);
      default: break;
    }
  }
#endif
  out_rows_portable(prob, ss, rows, v, p.d, a, z, l, out);
}

// The largest tile size in `sizes` (descending, ending in 1) that fits n rows.
int64_t tile(int64_t n, std::initializer_list<int64_t> sizes) {
  for (int64_t size : sizes)
    if (size <= n) return size;
  return 1;
}

// ---------------------------------------------------------------- prefill

std::atomic<uint64_t> calls{0};  // a number per kernel call: a thread's packed keys are its own

// One thread's buffers, kept between calls (grown, never shrunk: no page faults once warm), and
// the kv head whose keys (and widened values) it holds.
struct Workspace {
  std::vector<float> qb, kt, vw, scores, l;
  uint64_t call = 0;
  int64_t bi = -1, kvh = -1, packed_k = 0, packed_v = 0;
};

thread_local Workspace workspace;

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

// Keys [0, upto) of (bi, kvh) packed into panels (zeros past s), values widened unless float32.
void pack(const Problem& p, Workspace& ws, uint64_t call, int64_t bi, int64_t kvh, int64_t upto) {
  if (ws.call != call || ws.bi != bi || ws.kvh != kvh) {
    ws.call = call, ws.bi = bi, ws.kvh = kvh, ws.packed_k = ws.packed_v = 0;
  }
  int64_t panels = (p.s + kPanel - 1) / kPanel, d = p.d;
  float* kt = sized(ws.kt, panels * d * kPanel);
  std::vector<float> row(d);
  int64_t end = std::min(p.s, (upto + kPanel - 1) / kPanel * kPanel);
  for (int64_t j = ws.packed_k; j < end; ++j) {
    widen_row(p, p.k, p.k_scale, bi, kvh, j, row.data());
    float* dst = kt + (j / kPanel) * d * kPanel + j % kPanel;
    for (int64_t c = 0; c < d; ++c) dst[c * kPanel] = row[c];
  }
  if (end == p.s && ws.packed_k < end)  // the last panel's columns past s: never seen, zero
    for (int64_t j = p.s; j < panels * kPanel; ++j)
      for (int64_t c = 0; c < d; ++c) kt[(j / kPanel) * d * kPanel + c * kPanel + j % kPanel] = 0;
  ws.packed_k = std::max(ws.packed_k, end);
  if (p.storage != kFloat32) {
    float* vw = sized(ws.vw, p.s * d);
    for (int64_t j = ws.packed_v; j < std::min(p.s, upto); ++j)
      widen_row(p, p.v, p.v_scale, bi, kvh, j, vw + j * d);
    ws.packed_v = std::max(ws.packed_v, std::min(p.s, upto));
  }
}

// The key columns each bias row leaves visible, [lo, hi) per row [b, hb, t].
struct Extents {
  std::vector<int64_t> lo, hi;
  int64_t at(const Problem& p, int64_t bi, int64_t i, int64_t head) const {
    return (bi * p.hb + (p.hb == 1 ? 0 : head)) * p.t + i;
  }
};

// Exact attention of query rows [i0, i1) of head `head` of batch row bi.
void prefill_block(const Problem& p, const Extents& ext, uint64_t call, int64_t bi, int64_t head,
                   int64_t i0, int64_t i1) {
  Workspace& ws = workspace;
  int64_t rows = i1 - i0, d = p.d, kvh = head / p.group();
  int64_t ss = (p.s + kPanel - 1) / kPanel * kPanel;  // score row stride
  const int64_t* lo = ext.lo.data() + ext.at(p, bi, i0, head);
  const int64_t* hi = ext.hi.data() + ext.at(p, bi, i0, head);
  int64_t width = *std::max_element(hi, hi + rows);
  if (width == 0) {  // no row sees a key
    for (int64_t r = 0; r < rows; ++r) std::fill_n(p.out_row(bi, i0 + r, head), d, 0.0f);
    return;
  }
  pack(p, ws, call, bi, kvh, width);
  float* qb = sized(ws.qb, rows * d);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(qb + r * d, p.q_row(bi, i0 + r, head), d * 4);
  float* s = sized(ws.scores, rows * ss);
  float* l = sized(ws.l, rows);
  // Scores: each tile of rows against the panels that hold a column one of its rows sees.
  for (int64_t r0 = 0, n; r0 < rows; r0 += n) {
    n = tile(rows - r0, {kScoreRows, 8, 4, 2, 1});
    int64_t a = p.s, z = 0;
    for (int64_t r = r0; r < r0 + n; ++r)
      if (hi[r] > lo[r]) a = std::min(a, lo[r]), z = std::max(z, hi[r]);
    if (z > a) score_rows(p, qb + r0 * d, n, ws.kt.data(), a / kPanel, (z + kPanel - 1) / kPanel,
                          s + r0 * ss, ss);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float top;
    l[r] = hi[r] > lo[r]
               ? softmax_row(p, s + r * ss, p.bias_row(bi, i0 + r, head), lo[r], hi[r], &top)
               : 0.0f;
  }
  // P @ V: each tile of rows over the union of its rows' columns, zero where a row sees nothing.
  const float* v = p.storage == kFloat32 ? wide_rows(p, p.v, bi, kvh) : ws.vw.data();
  float* out[kOutRows];
  for (int64_t r0 = 0, n; r0 < rows; r0 += n) {
    n = tile(rows - r0, {kOutRows, 4, 2, 1});
    int64_t a = p.s, z = 0;
    for (int64_t r = r0; r < r0 + n; ++r) {
      out[r - r0] = p.out_row(bi, i0 + r, head);
      if (hi[r] > lo[r]) a = std::min(a, lo[r]), z = std::max(z, hi[r]);
    }
    if (z <= a) a = z = 0;
    for (int64_t r = r0; r < r0 + n; ++r) {
      float* row = s + r * ss;
      int64_t from = hi[r] > lo[r] ? lo[r] : z, to = hi[r] > lo[r] ? hi[r] : z;
      std::fill(row + a, row + std::max(a, from), 0.0f);
      std::fill(row + std::min(z, to), row + z, 0.0f);
    }
    out_rows(p, s + r0 * ss, ss, n, v, a, z, l + r0, out);
  }
}

void prefill(ffi::ThreadPool& pool, const Problem& p) {
  uint64_t call = calls.fetch_add(1) + 1;
  Extents ext;  // once per bias row, not once per head when the heads share the bias
  int64_t n = p.b * p.hb * p.t;
  ext.lo.resize(n), ext.hi.resize(n);
  parallel_for(pool, (n + 255) / 256, [&](int64_t c) {
    for (int64_t row = c * 256; row < std::min(n, c * 256 + 256); ++row)
      extent(p, p.bias + row * p.s, ext.lo[row], ext.hi[row]);
  });
  int64_t blocks = (p.t + p.block - 1) / p.block;
  // Items in (batch, head, block) order: a thread's consecutive items share a kv head's keys.
  parallel_for(pool, p.b * p.h * blocks, [&](int64_t item) {
    int64_t blk = item % blocks, head = (item / blocks) % p.h, bi = item / blocks / p.h;
    int64_t i0 = blk * p.block;
    prefill_block(p, ext, call, bi, head, i0, std::min(p.t, i0 + p.block));
  });
}

// ---------------------------------------------------------------- decode

// Each (batch, kv head) splits the key columns its rows (g heads x t positions) see into
// `chunks` chunks; a chunk's partial for a row is (m, l, o[d]).
struct Decode {
  int64_t chunks, rows, stride;  // stride: floats per partial, d + 2
  std::vector<int64_t> lo, hi;  // [b kh]: the columns any row of the group sees
  std::vector<float> partials;  // [b kh chunks rows stride]
};

void decode_chunk(const Problem& p, Decode& dec, int64_t item) {
  int64_t group = item / dec.chunks, c = item % dec.chunks;
  int64_t bi = group / p.kh, kvh = group % p.kh, g = p.group(), d = p.d;
  int64_t lo = dec.lo[group], hi = dec.hi[group];
  int64_t per = (hi - lo + dec.chunks - 1) / dec.chunks;
  int64_t j0 = std::min(hi, lo + c * per), j1 = std::min(hi, j0 + per), n = j1 - j0;
  float* part = dec.partials.data() + item * dec.rows * dec.stride;
  for (int64_t r = 0; r < dec.rows; ++r) {
    float* pr = part + r * dec.stride;
    pr[0] = kNegInf, pr[1] = 0;
    std::fill_n(pr + 2, d, 0.0f);
  }
  if (n <= 0) return;
  Workspace& ws = workspace;
  float* x = sized(ws.scores, dec.rows * n);
  float* row = sized(ws.qb, d);
  const float* wide_k = p.storage == kFloat32 ? wide_rows(p, p.k, bi, kvh) : nullptr;
  const float* wide_v = p.storage == kFloat32 ? wide_rows(p, p.v, bi, kvh) : nullptr;
  // Rows are (head of the group, position): r = gi * t + i. Raw dot products first (0 where
  // the bias hides the key), then scale, bias and softmax per row.
#if SLIMLLM_X86
  if (p.fast && decode_scores_fast(p, bi, kvh, dec.rows, j0, j1, x)) {
  } else
#endif
  {
    for (int64_t j = j0; j < j1; ++j) {
      const float* key = wide_k ? wide_k + j * d : row;
      if (!wide_k) widen_row(p, p.k, p.k_scale, bi, kvh, j, row);
      for (int64_t r = 0; r < dec.rows; ++r) {
        int64_t head = kvh * g + r / p.t, i = r % p.t;
        float b = p.bias_row(bi, i, head)[j];
        x[r * n + j - j0] = (std::isinf(b) && b < 0) ? 0.0f : dot(p, p.q_row(bi, i, head), key);
      }
    }
  }
  for (int64_t r = 0; r < dec.rows; ++r) {
    const float* bias = p.bias_row(bi, r % p.t, kvh * g + r / p.t) + j0;
    part[r * dec.stride + 1] = softmax_row(p, x + r * n, bias, 0, n, part + r * dec.stride);
  }
#if SLIMLLM_X86
  if (p.fast &&
      decode_values_fast(p, bi, kvh, dec.rows, j0, j1, x, part, dec.stride))
    return;
#endif
  for (int64_t j = j0; j < j1; ++j) {
    const float* value = wide_v ? wide_v + j * d : row;
    if (!wide_v) widen_row(p, p.v, p.v_scale, bi, kvh, j, row);
    for (int64_t r = 0; r < dec.rows; ++r) {
      float w = x[r * n + j - j0];
      if (w != 0) axpy(p, w, value, part + r * dec.stride + 2);
    }
  }
}

// The columns [lo, hi) any row of group (bi, kvh) sees (0, 0 if none). Rows of a group that
// share one bias row (hb = 1: every head of a position) are scanned once.
void group_extent(const Problem& p, const Decode& dec, int64_t group, int64_t& lo, int64_t& hi) {
  int64_t bi = group / p.kh, kvh = group % p.kh, g = p.group(), a = p.s, z = 0;
  const float* scanned = nullptr;
  for (int64_t r = 0; r < dec.rows; ++r) {
    const float* bias = p.bias_row(bi, r % p.t, kvh * g + r / p.t);
    if (bias == scanned) continue;
    scanned = bias;
    int64_t row_lo, row_hi;
    extent(p, bias, row_lo, row_hi);
    if (row_hi > row_lo) a = std::min(a, row_lo), z = std::max(z, row_hi);
  }
  lo = z > a ? a : 0, hi = z > a ? z : 0;
}

// Row r of group (bi, kvh): its chunks' partials merged into the output (the reference's
// split_keys_decode: out = sum_c o_c e^(m_c - m) / sum_c l_c e^(m_c - m)).
void merge_row(const Problem& p, const Decode& dec, int64_t group, int64_t r) {
  int64_t bi = group / p.kh, kvh = group % p.kh, g = p.group(), d = p.d;
  const float* first = dec.partials.data() + (group * dec.chunks * dec.rows + r) * dec.stride;
  int64_t step = dec.rows * dec.stride;  // from one chunk's partial to the next's
  float top = kNegInf;
  for (int64_t c = 0; c < dec.chunks; ++c) top = std::max(top, first[c * step]);
  float* out = p.out_row(bi, r % p.t, kvh * g + r / p.t);
  std::fill_n(out, d, 0.0f);
  if (top == kNegInf) return;
  float total = 0;
  for (int64_t c = 0; c < dec.chunks; ++c) {
    const float* part = first + c * step;
    if (part[0] == kNegInf) continue;
    float w = std::exp(part[0] - top);
    total += w * part[1];
    for (int64_t k = 0; k < d; ++k) out[k] += w * part[2 + k];
  }
  for (int64_t k = 0; k < d; ++k) out[k] /= total;
}

// Passes over the (batch, kv head) groups, each split among the threads: the columns each
// group sees, its key chunks, the chunks' merge (by the chunk's own item where a group has one
// chunk, as at batch 16: one scheduling of the pool fewer). (At batch 16 the first and last
// ran on the calling thread alone: a third of the kernel's samples on the 156M shape, `perf`.)
void decode(ffi::ThreadPool& pool, const Problem& p) {
  constexpr bool kStay = true;  // decode: helpers linger for the next call (kernels.h)
  Decode dec;
  int64_t groups = p.b * p.kh;
  dec.rows = p.group() * p.t, dec.stride = p.d + 2;
  dec.lo.assign(groups, 0), dec.hi.assign(groups, 0);
  parallel_for(pool, groups, [&](int64_t group) {
    group_extent(p, dec, group, dec.lo[group], dec.hi[group]);
  }, kStay);
  int64_t widest = 0;
  for (int64_t group = 0; group < groups; ++group)
    widest = std::max(widest, dec.hi[group] - dec.lo[group]);
  // Enough chunks for four items per thread, none shorter than kMinChunk keys.
  int64_t want = (4 * std::max<int64_t>(pool.num_threads(), 1) + groups - 1) / groups;
  dec.chunks = std::max<int64_t>(1, std::min(want, widest / kMinChunk));
  if (p.chunks > 0) dec.chunks = std::min(dec.chunks, p.chunks);
  dec.partials.resize(groups * dec.chunks * dec.rows * dec.stride);
  parallel_for(pool, groups * dec.chunks, [&](int64_t item) {
    decode_chunk(p, dec, item);
    if (dec.chunks == 1)  // the group's only chunk: merged by the same item, no third pass
      for (int64_t r = 0; r < dec.rows; ++r) merge_row(p, dec, item, r);
  });
  if (dec.chunks > 1)
    parallel_for(pool, groups, [&](int64_t group) {
      for (int64_t r = 0; r < dec.rows; ++r) merge_row(p, dec, group, r);
    }, kStay);
}

// ---------------------------------------------------------------- the handler

const ffi::DataType kStorageType[] = {ffi::F32, ffi::BF16, ffi::S8};

using Tensor = ffi::Buffer<ffi::F32, 4>;
using TensorResult = ffi::ResultBuffer<ffi::F32, 4>;
using Scales = ffi::Buffer<ffi::F32, 3>;

ffi::Error attention(ffi::ThreadPool pool, Tensor q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     Scales k_scale, Scales v_scale, Tensor bias, TensorResult out, float scale,
                     int64_t block, int64_t chunks, int32_t storage) {
  if (storage < kFloat32 || storage > kInt8)
    return ffi::Error::InvalidArgument("slimllm_attention: unknown storage");
  auto qd = q.dimensions(), kd = k.dimensions(), bd = bias.dimensions();
  if (k.element_type() != kStorageType[storage] || v.element_type() != kStorageType[storage] ||
      kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("slimllm_attention: cache dtype or rank does not match");
  int64_t b = qd[0], t = qd[1], h = qd[2], d = qd[3], kh = kd[1], s = kd[2];
  for (int i = 0; i < 4; ++i)
    if (v.dimensions()[i] != kd[i] || out->dimensions()[i] != qd[i])
      return ffi::Error::InvalidArgument("slimllm_attention: shapes do not match");
  // the cache may hold more rows than the queries (a server's idle slots): rows [0, b) are read
  if (kd[0] < b || kd[3] != d || kh < 1 || h % kh || bd[0] != b || (bd[1] != 1 && bd[1] != h) ||
      bd[2] != t || bd[3] != s || block < 1 || chunks < 0)
    return ffi::Error::InvalidArgument("slimllm_attention: shapes do not match");
  if (storage == kInt8) {
    for (auto sd : {k_scale.dimensions(), v_scale.dimensions()})
      if (sd[0] < b || sd[1] != kh || sd[2] != s)
        return ffi::Error::InvalidArgument("slimllm_attention: scale shape does not match");
  }
  Problem p{q.typed_data(),
            static_cast<const uint8_t*>(k.untyped_data()),
            static_cast<const uint8_t*>(v.untyped_data()),
            k_scale.typed_data(),
            v_scale.typed_data(),
            bias.typed_data(),
            out->typed_data(),
            b, t, h, kh, s, d, bd[1],
            scale,
            storage,
            std::min(block, std::max<int64_t>(t, 1)),
            chunks,
            SLIMLLM_X86 && has_avx512() && d % 16 == 0};
  if (b * t * h * d == 0) return ffi::Error::Success();
  if (s == 0) {
    std::memset(p.out, 0, sizeof(float) * b * t * h * d);
    return ffi::Error::Success();
  }
  if (t <= kDecodeRows) {
    decode(pool, p);
  } else {
    prefill(pool, p);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace slimllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(slimllm_attention, slimllm::attention,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<slimllm::Tensor>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<slimllm::Scales>()
                                  .Arg<slimllm::Scales>()
                                  .Arg<slimllm::Tensor>()
                                  .Ret<slimllm::Tensor>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("chunks")
                                  .Attr<int32_t>("storage"));
