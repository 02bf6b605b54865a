// Low-bit linear layers for a few rows of activations (decode): y = x W^T with W in int4 (Q4_0/Q4_1) or int8
// (Q8_0) blocks of 32 weights, each block with its own scale d (and, for int4, minimum m): w = d*q + m.
//
// The arithmetic, per output row n and activation row x:
//   1. x is quantized once per call to int16 with one scale per row: x ~= sx * xq (error ~2^-16 of max|x|).
//   2. For each block g the integer dot product sum_i q_i * xq_i is exact (vpdpwssd: int16 pairs -> int32).
//   3. y = sx * (sum_g d_g * dot_g + sum_g m_g * sum_i xq_i), all in float32.
// So the only rounding is that of x to 16 bits and of the float32 sums: closer to exact than bf16 activations.
//
// Layout (made by quantize.py at load time): output rows in tiles of 4, the input dimension in pairs of
// blocks (64 weights). Per tile and pair, 4 rows x 32 bytes of nibbles (int4) or 4 x 64 bytes (int8), so a
// tile is one sequential stream. Inside a pair, byte j holds, in its low nibble, weight 4t+e of block b and,
// in its high nibble, weight 4t+2+e, with j = 4t + 2b + e. After zero-extending the 32 bytes to 32 int16
// lanes and splitting the nibbles, one vpdpwssd lane (two adjacent int16) sees four weights of one block,
// even lanes block 0 and odd lanes block 1, so one vector of [d0, d1, d0, d1, ...] scales both blocks at
// once. The activations are permuted the same way when they are quantized.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace mini_claude {

namespace {

constexpr int kTile = 4;  // output rows per tile

bool g_portable = false;

// Position of weight w (0..31) of block b (0, 1) of a pair in the 64 int16 of the pair layout.
inline int64_t pair_slot(int64_t b, int64_t w) {
  const int64_t t = w / 4, r = w % 4;
  return (r >> 1) * 32 + 4 * t + 2 * b + (r & 1);
}

// ------------------------------------------------------------------------------- activation quantization

template <typename T>
void quantize_rows_portable(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t P, int16_t* q, float* sums,
                            float* scales) {
  const int64_t G = 2 * P;
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * ldx;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(to_float(xr[k])));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    scales[m] = amax / 32767.f;
    int16_t* qr = q + m * P * 64;
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t w = 0; w < 32; ++w) {
        const int64_t k = g * 32 + w;
        int32_t v = 0;
        if (k < K) v = static_cast<int32_t>(std::clamp(std::nearbyint(to_float(xr[k]) * inv), -32767.f, 32767.f));
        qr[(g / 2) * 64 + pair_slot(g % 2, w)] = static_cast<int16_t>(v);
        s += v;
      }
      sums[m * G + g] = static_cast<float>(s);
    }
  }
}

#ifdef MC_AVX512
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 k) {
  __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T>
void quantize_rows_avx512(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t P, int16_t* q, float* sums,
                          float* scales) {
  alignas(64) int16_t lo_idx[32], hi_idx[32];
  for (int64_t j = 0; j < 32; ++j) {  // inverse of pair_slot: which of the pair's 64 weights lands in slot j
    const int64_t t = j / 4, b = (j / 2) % 2, e = j % 2;
    lo_idx[j] = static_cast<int16_t>(b * 32 + 4 * t + e);
    hi_idx[j] = static_cast<int16_t>(b * 32 + 4 * t + 2 + e);
  }
  const __m512i vlo = _mm512_load_si512(lo_idx), vhi = _mm512_load_si512(hi_idx);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const int64_t G = 2 * P;
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * ldx;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_and_ps(load16(xr + k, tail_mask(K - k)), sign));
    const float amax = _mm512_reduce_max_ps(vmax);
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    scales[m] = amax / 32767.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t p = 0; p < P; ++p) {
      __m512i v[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t k = p * 64 + i * 16;
        const __m512 f = k < K ? load16(xr + k, tail_mask(K - k)) : _mm512_setzero_ps();
        v[i] = _mm512_cvtps_epi32(_mm512_mul_ps(f, vinv));  // round to nearest even, as std::nearbyint
      }
      sums[m * G + 2 * p] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(v[0], v[1])));
      sums[m * G + 2 * p + 1] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(v[2], v[3])));
      const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(v[0])),
                                           _mm512_cvtsepi32_epi16(v[1]), 1);
      const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(v[2])),
                                           _mm512_cvtsepi32_epi16(v[3]), 1);
      int16_t* qp = q + m * P * 64 + p * 64;
      _mm512_storeu_si512(qp, _mm512_permutex2var_epi16(a, vlo, b));
      _mm512_storeu_si512(qp + 32, _mm512_permutex2var_epi16(a, vhi, b));
    }
  }
}
#endif

#ifdef MC_AVX2
// One block of 32 activations -> its int16 as two vectors of 16 in natural order, and their exact sum.
template <typename T>
inline int32_t quantize_block8(const T* x, __m256 vinv, __m256i half[2]) {
  __m256i v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + 8 * i), vinv));  // nearest even
  // packs works per 128-bit lane ([a0-3, b0-3, a4-7, b4-7]); the 64-bit permute puts the halves in order.
  half[0] = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xD8);
  half[1] = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[2], v[3]), 0xD8);
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

// The pair layout in 32-bit units (two int16 weights each): unit u of the low half holds even unit u / 2 of
// block u % 2, unit u of the high half its odd unit u / 2 (see pair_slot). One permute per block and half,
// and a blend of the two blocks' results, build each 16-lane vector of it.
template <typename T>
void quantize_rows_avx2(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t P, int16_t* q, float* sums,
                        float* scales) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i even = _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6), odd = _mm256_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7);
  const int64_t G = 2 * P;
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * ldx;
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8(xr + k), sign));  // K % 32 == 0
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    scales[m] = amax / 32767.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t p = 0; p < P; ++p) {
      __m256i half[2][2];  // [block][weights 0-15, 16-31]
      for (int b = 0; b < 2; ++b) {
        const int64_t k = (2 * p + b) * 32;
        int32_t s = 0;
        if (k < K) {
          s = quantize_block8(xr + k, vinv, half[b]);
        } else {
          half[b][0] = half[b][1] = _mm256_setzero_si256();
        }
        sums[m * G + 2 * p + b] = static_cast<float>(s);
      }
      __m256i* qp = reinterpret_cast<__m256i*>(q + m * P * 64 + p * 64);
      for (int i = 0; i < 2; ++i) {
        const __m256i idx = i == 0 ? even : odd;
        for (int hh = 0; hh < 2; ++hh)
          _mm256_storeu_si256(qp + 2 * i + hh,
                              _mm256_blend_epi32(_mm256_permutevar8x32_epi32(half[0][hh], idx),
                                                 _mm256_permutevar8x32_epi32(half[1][hh], idx), 0xAA));
      }
    }
  }
}
#endif

struct Activations {
  std::vector<int16_t> q;
  std::vector<float> sums, scales;
  int64_t M = 0, P = 0;
};

// x: (M, K) rows with a unit inner stride.
Activations quantize(const at::Tensor& x, int64_t P) {
  Activations a;
  a.M = x.size(0);
  a.P = P;
  const int64_t K = x.size(1), ldx = x.stride(0);
  a.q.resize(a.M * P * 64);
  a.sums.resize(a.M * 2 * P);
  a.scales.resize(a.M);
  AT_DISPATCH_SWITCH(x.scalar_type(), "quantize_activations",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      const float* px = x.data_ptr<float>();
#ifdef MC_AVX512
      if (!g_portable) return quantize_rows_avx512(px, ldx, a.M, K, P, a.q.data(), a.sums.data(), a.scales.data());
#endif
#ifdef MC_AVX2
      if (!g_portable) return quantize_rows_avx2(px, ldx, a.M, K, P, a.q.data(), a.sums.data(), a.scales.data());
#endif
      quantize_rows_portable(px, ldx, a.M, K, P, a.q.data(), a.sums.data(), a.scales.data());
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      const at::BFloat16* px = x.data_ptr<at::BFloat16>();
#ifdef MC_AVX512
      if (!g_portable) return quantize_rows_avx512(px, ldx, a.M, K, P, a.q.data(), a.sums.data(), a.scales.data());
#endif
#ifdef MC_AVX2
      if (!g_portable) return quantize_rows_avx2(px, ldx, a.M, K, P, a.q.data(), a.sums.data(), a.scales.data());
#endif
      quantize_rows_portable(px, ldx, a.M, K, P, a.q.data(), a.sums.data(), a.scales.data());
    }));
  return a;
}

// ------------------------------------------------------------------------------------------ scale reads

inline float scale_at(const void* s, bool f16, int64_t i) {
  return f16 ? static_cast<float>(static_cast<const at::Half*>(s)[i]) : static_cast<const float*>(s)[i];
}

#ifdef MC_AVX512
// [d0, d1, d0, d1, ...] from the two scales of one row of a pair.
inline __m512 pair_scales(const void* s, bool f16, int64_t i) {
  if (f16) {
    int32_t bits;
    std::memcpy(&bits, static_cast<const uint16_t*>(s) + i, 4);
    return _mm512_cvtph_ps(_mm256_set1_epi32(bits));
  }
  double bits;
  std::memcpy(&bits, static_cast<const float*>(s) + i, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(bits));
}

inline __m512i dot_pairs(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

// Up to 16 float16 or float32 values from element i on (lanes outside `k` are 0).
inline __m512 load_scales16(const void* s, bool f16, int64_t i, __mmask16 k) {
  return f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(s) + i))
             : _mm512_maskz_loadu_ps(k, static_cast<const float*>(s) + i);
}

// The lane sums of four vectors at once, [sum v0, sum v1, sum v2, sum v3]: a transpose-and-add in 9
// shuffles and adds, where four separate reductions take about 24. With 16 sums per tile of 4 x 4 outputs,
// separate reductions were a large part of the work for the short rows (K = 576) of most layers.
inline __m128 add_lanes4(const __m512 v[4]) {
  // Per 128-bit lane: [v0_0 + v0_2, v1_0 + v1_2, v0_1 + v0_3, v1_1 + v1_3], and the same of v2, v3.
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
  // Per 128-bit lane: [v0, v1, v2, v3], each summed over its four lanes there.
  const __m512d ad = _mm512_castps_pd(a), bd = _mm512_castps_pd(b);
  const __m512 c = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ad, bd)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(ad, bd)));
  const __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}
#endif

#ifdef MC_AVX2
// [d0, d1, d0, d1, ...] (8 lanes) from the two scales of one row of a pair.
inline __m256 pair_scales8(const void* s, bool f16, int64_t i) {
  if (f16) {
    int32_t bits;
    std::memcpy(&bits, static_cast<const uint16_t*>(s) + i, 4);
    return _mm256_cvtph_ps(_mm_set1_epi32(bits));
  }
  double bits;
  std::memcpy(&bits, static_cast<const float*>(s) + i, 8);
  return _mm256_castpd_ps(_mm256_set1_pd(bits));
}

// Up to 8 float16 or float32 values from element i on; lanes from `left` on are 0 and not read. A masked
// load, not a copy through the stack: the scalar stores and the vector load of a copy stall store forwarding,
// and every tile of a K = 576 layer (18 blocks) has such a tail. `left` is even (blocks come in pairs).
alignas(32) constexpr int32_t kLaneMasks[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline __m256 load_scales8(const void* s, bool f16, int64_t i, int64_t left) {
  if (f16) {
    const int32_t* p = reinterpret_cast<const int32_t*>(static_cast<const uint16_t*>(s) + i);
    const __m128i h = left >= 8 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                : _mm_maskload_epi32(p, _mm_loadu_si128(reinterpret_cast<const __m128i*>(kLaneMasks + 8 - left / 2)));
    return _mm256_cvtph_ps(h);
  }
  const float* p = static_cast<const float*>(s) + i;
  return left >= 8 ? _mm256_loadu_ps(p)
                   : _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMasks + 8 - left)));
}

// [sum v0, sum v1, sum v2, sum v3] of four 8-float vectors: three horizontal adds and one add, where four
// separate hsum8 take twelve shuffles and adds.
inline __m128 add_lanes4(const __m256 v[4]) {
  const __m256 c = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

inline __m256i load16i(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i widen_u8(const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256i widen_i8(const uint8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// ---------------------------------------------------------------------------------------- the tile kernels

struct Weights {
  const uint8_t* q;  // tile 0 of this call
  const void* scales;
  const void* mins;  // int4 only
  int64_t q_stride, s_stride, m_stride;  // elements between consecutive tiles
  bool f16;  // scales (and mins) are float16, else float32
  int64_t P;
};

// out[m][r] for rows [m0, m0 + MB) of the activations and the 4 rows of one tile.
template <int MB, bool Q4>
void tile_avx512_or_portable(const Weights& w, int64_t tile, const Activations& a, int64_t m0, float out[][kTile]) {
  const int64_t P = w.P, G = 2 * P;
  const uint8_t* qw = w.q + tile * w.q_stride;
  const int64_t s_off = tile * w.s_stride;
  constexpr int64_t bytes = Q4 ? 32 : 64;  // per row and pair
#ifdef MC_AVX512
  if (!g_portable) {
    __m512 acc[MB][kTile];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kTile; ++r) acc[m][r] = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    for (int64_t p = 0; p < P; ++p) {
      __m512i lo[kTile], hi[kTile];
      __m512 s[kTile];
      const uint8_t* qp = qw + p * kTile * bytes;
      for (int r = 0; r < kTile; ++r) {
        if constexpr (Q4) {
          const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + r * 32)));
          lo[r] = _mm512_and_si512(w16, nibble);
          hi[r] = _mm512_srli_epi16(w16, 4);
        } else {
          lo[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + r * 64)));
          hi[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + r * 64 + 32)));
        }
        s[r] = pair_scales(w.scales, w.f16, s_off + (p * kTile + r) * 2);
      }
      for (int m = 0; m < MB; ++m) {
        const int16_t* xp = a.q.data() + (m0 + m) * P * 64 + p * 64;
        const __m512i xl = _mm512_loadu_si512(xp), xh = _mm512_loadu_si512(xp + 32);
        for (int r = 0; r < kTile; ++r) {
          const __m512i d = dot_pairs(dot_pairs(_mm512_setzero_si512(), lo[r], xl), hi[r], xh);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s[r], acc[m][r]);
        }
      }
    }
    if constexpr (Q4) {  // the minimums' term, sum_g m_g * xs_g, joins the lanes before they are added up
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 k = tail_mask(G - g);
        __m512 mins[kTile];
        for (int r = 0; r < kTile; ++r) mins[r] = load_scales16(w.mins, w.f16, tile * w.m_stride + r * G + g, k);
        for (int m = 0; m < MB; ++m) {
          const __m512 xs = _mm512_maskz_loadu_ps(k, a.sums.data() + (m0 + m) * G + g);
          for (int r = 0; r < kTile; ++r) acc[m][r] = _mm512_fmadd_ps(mins[r], xs, acc[m][r]);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      _mm_storeu_ps(out[m], _mm_mul_ps(add_lanes4(acc[m]), _mm_set1_ps(a.scales[m0 + m])));
    return;
  }
#endif
#ifdef MC_AVX2
  if (!g_portable) {
    // A 256-bit vector holds 16 of a pair half's 32 int16 lanes. int32 lane l of vpmaddwd sums slots 2l, 2l+1,
    // which belong to block l % 2 in both 16-lane halves and in both nibble halves (see pair_slot), so the four
    // products of a pair add up exactly in int32 (at most 4 * 2 * 127 * 32767 < 2^31) before one scaled
    // float multiply-add per lane.
    __m256 acc[MB][kTile];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kTile; ++r) acc[m][r] = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    for (int64_t p = 0; p < P; ++p) {
      const uint8_t* qp = qw + p * kTile * bytes;
      for (int r = 0; r < kTile; ++r) {
        __m256i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          if constexpr (Q4) {
            const __m256i w16 = widen_u8(qp + r * 32 + 16 * h);
            lo[h] = _mm256_and_si256(w16, nibble);
            hi[h] = _mm256_srli_epi16(w16, 4);
          } else {
            lo[h] = widen_i8(qp + r * 64 + 16 * h);
            hi[h] = widen_i8(qp + r * 64 + 32 + 16 * h);
          }
        }
        const __m256 s = pair_scales8(w.scales, w.f16, s_off + (p * kTile + r) * 2);
        for (int m = 0; m < MB; ++m) {
          const int16_t* xp = a.q.data() + (m0 + m) * P * 64 + p * 64;
          __m256i d = _mm256_madd_epi16(lo[0], load16i(xp));
          d = _mm256_add_epi32(d, _mm256_madd_epi16(lo[1], load16i(xp + 16)));
          d = _mm256_add_epi32(d, _mm256_madd_epi16(hi[0], load16i(xp + 32)));
          d = _mm256_add_epi32(d, _mm256_madd_epi16(hi[1], load16i(xp + 48)));
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[m][r]);
        }
      }
    }
    if constexpr (Q4) {  // the minimums' term, sum_g m_g * xs_g, joins the lanes before they are added up
      for (int64_t g = 0; g < G; g += 8) {
        __m256 mins[kTile];
        for (int r = 0; r < kTile; ++r) mins[r] = load_scales8(w.mins, w.f16, tile * w.m_stride + r * G + g, G - g);
        for (int m = 0; m < MB; ++m) {
          const __m256 xs = load_scales8(a.sums.data() + (m0 + m) * G, false, g, G - g);
          for (int r = 0; r < kTile; ++r) acc[m][r] = _mm256_fmadd_ps(mins[r], xs, acc[m][r]);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      _mm_storeu_ps(out[m], _mm_mul_ps(add_lanes4(acc[m]), _mm_set1_ps(a.scales[m0 + m])));
    return;
  }
#endif
  for (int m = 0; m < MB; ++m) {
    const int16_t* xr = a.q.data() + (m0 + m) * P * 64;
    const float* xs = a.sums.data() + (m0 + m) * G;
    for (int r = 0; r < kTile; ++r) {
      float total = 0.f;
      for (int64_t p = 0; p < P; ++p) {
        const uint8_t* qp = qw + (p * kTile + r) * bytes;
        const int16_t* xp = xr + p * 64;
        int32_t dot[2] = {0, 0};  // per block of the pair
        for (int64_t j = 0; j < 32; ++j) {
          int32_t wl, wh;
          if constexpr (Q4) {
            wl = qp[j] & 0x0F;
            wh = qp[j] >> 4;
          } else {
            wl = static_cast<int8_t>(qp[j]);
            wh = static_cast<int8_t>(qp[32 + j]);
          }
          dot[(j / 2) % 2] += wl * xp[j] + wh * xp[32 + j];
        }
        for (int b = 0; b < 2; ++b)
          total += static_cast<float>(dot[b]) * scale_at(w.scales, w.f16, s_off + (p * kTile + r) * 2 + b);
      }
      if constexpr (Q4) {
        for (int64_t g = 0; g < G; ++g) total += scale_at(w.mins, w.f16, tile * w.m_stride + r * G + g) * xs[g];
      }
      out[m][r] = total * a.scales[m0 + m];
    }
  }
}

template <bool Q4>
void tile_rows(const Weights& w, int64_t tile, const Activations& a, int64_t m0, int64_t rows, float out[][kTile]) {
#ifdef MC_AVX2
  // 16 vector registers: the accumulators of 4 x 4 outputs alone would fill them and spill in every step, so 3
  // or 4 rows go as 2 + 1 or 2 + 2 (the 512-row prefill of the four layer shapes: 1,081 -> 997 ms per 30 layers).
  if (!g_portable && rows > 2) {
    tile_avx512_or_portable<2, Q4>(w, tile, a, m0, out);
    return rows == 3 ? tile_avx512_or_portable<1, Q4>(w, tile, a, m0 + 2, out + 2)
                     : tile_avx512_or_portable<2, Q4>(w, tile, a, m0 + 2, out + 2);
  }
#endif
  switch (rows) {
    case 1: return tile_avx512_or_portable<1, Q4>(w, tile, a, m0, out);
    case 2: return tile_avx512_or_portable<2, Q4>(w, tile, a, m0, out);
    case 3: return tile_avx512_or_portable<3, Q4>(w, tile, a, m0, out);
    default: return tile_avx512_or_portable<4, Q4>(w, tile, a, m0, out);
  }
}

// Whether every tile (index 0) is laid out densely: strides as if contiguous, ignoring dims of size 1.
bool dense_tiles(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// y (M, N) = the tiles' outputs + bias, the tiles split among the threads.
template <typename scalar_t, bool Q4>
void run_tiles(const Weights& w, const Activations& a, int64_t N, int64_t T, int64_t chunk, const float* pbias,
               scalar_t* py) {
  const int64_t M = a.M;
  parallel_for(T, chunk, [&](int64_t begin, int64_t end) {
    float out[4][kTile];
    for (int64_t t = begin; t < end; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t rows = std::min<int64_t>(4, M - m0);
        tile_rows<Q4>(w, t, a, m0, rows, out);
        for (int64_t m = 0; m < rows; ++m)
          for (int r = 0; r < kTile; ++r) {
            const int64_t n = t * kTile + r;
            if (n < N) py[(m0 + m) * N + n] = from_float<scalar_t>(out[m][r] + (pbias ? pbias[n] : 0.f));
          }
      }
  });
}

template <bool Q4>
at::Tensor lowbit_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor* mins, const c10::optional<at::Tensor>& bias, int64_t N,
                         c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "low-bit linear: x must be float32 or bfloat16");
  const int64_t K = x_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), T = qweight.size(0), P = qweight.size(1);
  TORCH_CHECK(qweight.dim() == 4 && qweight.size(2) == kTile && qweight.size(3) == (Q4 ? 32 : 64),
              "low-bit linear: qweight is not in the packed layout");
  TORCH_CHECK(K % 32 == 0 && (K + 63) / 64 == P, "low-bit linear: x has ", K, " features but the weight holds ", P,
              " pairs of 32-weight blocks");
  TORCH_CHECK(N <= T * kTile && N > (T - 1) * kTile, "low-bit linear: out_features does not fit the tiles");
  TORCH_CHECK(dense_tiles(qweight), "low-bit linear: qweight tiles must be contiguous");
  const bool f16 = scales.scalar_type() == at::kHalf;
  TORCH_CHECK(f16 || scales.scalar_type() == at::kFloat, "low-bit linear: scales must be float16 or float32");
  TORCH_CHECK(scales.dim() == 4 && scales.size(0) == T && scales.size(1) == P && dense_tiles(scales),
              "low-bit linear: scale tiles must be (tiles, pairs, 4, 2), each contiguous");
  if (mins) {
    TORCH_CHECK(mins->scalar_type() == scales.scalar_type() && mins->dim() == 3 && mins->size(0) == T &&
                    mins->size(2) == 2 * P && dense_tiles(*mins),
                "low-bit linear: mins must be (tiles, 4, 2 * pairs), each tile contiguous");
  }
  const float* pbias = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    pbias = b.data_ptr<float>();
  }
  Weights w{static_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr(), mins ? mins->data_ptr() : nullptr,
            qweight.stride(0), scales.stride(0), mins ? mins->stride(0) : 0, f16, P};
  const Activations a = quantize(x, P);
  const at::ScalarType odt = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16, "low-bit linear: output must be float32 or bfloat16");
  at::Tensor y = at::empty({M, N}, x.options().dtype(odt));
  // Chunks of at least ~64k weight-rows of work, and about 4 per thread so a late thread's share is small.
  const int64_t min_chunk = std::max<int64_t>(1, 65536 / (kTile * 64 * P * std::max<int64_t>(M, 1)));
  const int64_t chunk = std::max<int64_t>(min_chunk, (T + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads()));
  AT_DISPATCH_SWITCH(odt, "lowbit_linear",
    AT_DISPATCH_CASE(at::kFloat, [&] { run_tiles<float, Q4>(w, a, N, T, chunk, pbias, y.data_ptr<float>()); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      run_tiles<at::BFloat16, Q4>(w, a, N, T, chunk, pbias, y.data_ptr<at::BFloat16>());
    }));
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

bool portable() { return g_portable; }
void set_portable(bool on) { g_portable = on; }
std::string isa() {
#ifdef MC_AVX2
  if (!g_portable) return "avx2";
#endif
#ifdef MC_AVX512
  if (!g_portable) {
#if defined(__AVX512VNNI__)
    return "avx512-vnni";
#else
    return "avx512";
#endif
  }
#endif
  return "portable";
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias, int64_t out_features,
                     c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "q4_linear: qweight must be uint8");
  return lowbit_linear<true>(x, qweight, scales, &mins, bias, out_features, out_dtype);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t out_features,
                     c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "q8_linear: qweight must be int8");
  return lowbit_linear<false>(x, qweight, scales, nullptr, bias, out_features, out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x, int64_t pairs) {
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  const Activations a = quantize(x2, pairs);
  auto q = at::empty({a.M, pairs * 64}, x.options().dtype(at::kShort));
  auto s = at::empty({a.M, 2 * pairs}, x.options().dtype(at::kFloat));
  auto sc = at::empty({a.M}, x.options().dtype(at::kFloat));
  std::memcpy(q.data_ptr(), a.q.data(), a.q.size() * sizeof(int16_t));
  std::memcpy(s.data_ptr(), a.sums.data(), a.sums.size() * sizeof(float));
  std::memcpy(sc.data_ptr(), a.scales.data(), a.scales.size() * sizeof(float));
  return {q, s, sc};
}

}  // namespace mini_claude
