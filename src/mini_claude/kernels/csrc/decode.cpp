// The small kernels of one decode step: attention of one new query per sequence over its cached keys, RoPE
// with the key/value write into the cache, RMSNorm, SwiGLU's silu(gate) * up, and the greedy pick of the next
// token (each row's maximum and its index). Each replaces a handful
// of PyTorch ops (and their per-op dispatch cost, which dominates at one token per sequence) by one call.
//
// All arithmetic is float32; bfloat16 inputs are widened and results rounded once at the end.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace mini_claude {

namespace {

#ifdef MC_AVX512
// e^x for x <= 0 up to ~1e-7 relative error: 2^n * P(r), x = n ln2 + r, |r| <= ln2/2, Taylor degree 7.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

#ifdef MC_AVX2
// The same e^x as the AVX-512 one, on 8 lanes: 2^n is built in the exponent bits (n >= -126 for x >= -87.3).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

template <bool Vec, typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef MC_AVX512
  if (Vec)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
#ifdef MC_AVX2
  if (Vec)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

template <bool Vec>
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef MC_AVX512
  if (Vec && n >= 16) {
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
  }
#endif
#ifdef MC_AVX2
  if (Vec && n >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
  }
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <bool Vec>
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef MC_AVX512
  if (Vec) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  }
#endif
#ifdef MC_AVX2
  if (Vec) {
    const __m256 va = _mm256_set1_ps(alpha);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// In place: s[i] = exp(s[i] - max); returns the sum.
template <bool Vec>
inline float exp_shifted(float* s, int64_t n, float max) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef MC_AVX512
  if (Vec) {
    const __m512 vm = _mm512_set1_ps(max);
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
      _mm512_storeu_ps(s + i, e);
      acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
  }
#endif
#ifdef MC_AVX2
  if (Vec) {
    const __m256 vm = _mm256_set1_ps(max);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
      _mm256_storeu_ps(s + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
  }
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - max);
    sum += s[i];
  }
  return sum;
}

// Visit the keys [0, L) of one sequence block by block: f(s, offset of key s in its block, block index).
template <typename F>
inline void for_each_key(const int32_t* table, int64_t L, int64_t BS, F&& f) {
  for (int64_t first = 0, i = 0; first < L; first += BS, ++i) {
    const int64_t n = std::min(BS, L - first), block = table[i];
    for (int64_t off = 0; off < n; ++off) f(first + off, off, block);
  }
}

template <typename T, bool Vec>
void attend(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tables,
            const at::Tensor& lengths, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_pool.size(1), BS = k_pool.size(2);
  const int64_t G = H / Hkv, n_table = tables.size(1);
  const T* pq = q.data_ptr<T>();
  const T* pk = k_pool.data_ptr<T>();
  const T* pv = v_pool.data_ptr<T>();
  T* po = out.data_ptr<T>();
  const int32_t* pt = tables.data_ptr<int32_t>();
  const int32_t* pl = lengths.data_ptr<int32_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = k_pool.stride(0), ks1 = k_pool.stride(1), ks2 = k_pool.stride(2);
  const int64_t vs0 = v_pool.stride(0), vs1 = v_pool.stride(1), vs2 = v_pool.stride(2);
  const int64_t ts0 = tables.stride(0);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pl[b] >= 1 && pl[b] <= n_table * BS, "decode_attention: length ", pl[b], " of row ", b,
                " does not fit its block table");
    max_len = std::max<int64_t>(max_len, pl[b]);
  }
  const int64_t work = max_len * G * D;  // per task; small ones are not worth waking a second thread
  parallel_for(B * Hkv, work >= 32768 ? 1 : B * Hkv, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), row(D), acc(G * D), scores, inv_sum(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv, L = pl[b];
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g) {
        widen<Vec>(pq + b * qs0 + (hk * G + g) * qs1, qf.data() + g * D, D);
        for (int64_t i = 0; i < D; ++i) qf[g * D + i] *= scale;
      }
      const int32_t* table = pt + b * ts0;
      const T* kh = pk + hk * ks1;
      const T* vh = pv + hk * vs1;
      for_each_key(table, L, BS, [&](int64_t s, int64_t off, int64_t block) {
        widen<Vec>(kh + block * ks0 + off * ks2, row.data(), D);
        for (int64_t g = 0; g < G; ++g) scores[g * L + s] = dot<Vec>(qf.data() + g * D, row.data(), D);
      });
      for (int64_t g = 0; g < G; ++g) {  // softmax in float32, max-shifted
        float* sg = scores.data() + g * L;
        const float mx = *std::max_element(sg, sg + L);
        inv_sum[g] = 1.f / exp_shifted<Vec>(sg, L, mx);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_key(table, L, BS, [&](int64_t s, int64_t off, int64_t block) {
        widen<Vec>(vh + block * vs0 + off * vs2, row.data(), D);
        for (int64_t g = 0; g < G; ++g) axpy<Vec>(scores[g * L + s], row.data(), acc.data() + g * D, D);
      });
      for (int64_t g = 0; g < G; ++g) {
        T* o = po + (b * H + hk * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = from_float<T>(acc[g * D + i] * inv_sum[g]);
      }
    }
  });
}

template <typename T>
void rope_write(const at::Tensor& qkv, const at::Tensor& positions, const float* cos, const float* sin,
                int64_t n_rope, at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& tables, int64_t H, int64_t Hkv,
                at::Tensor& q_out) {
  const int64_t B = qkv.size(0), T_ = qkv.size(1), D = q_out.size(3), half = D / 2, BS = k_pool.size(2);
  const T* px = qkv.data_ptr<T>();
  T* pq = q_out.data_ptr<T>();
  T* pk = k_pool.data_ptr<T>();
  T* pv = v_pool.data_ptr<T>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const int32_t* pt = tables.data_ptr<int32_t>();
  const int64_t xs0 = qkv.stride(0), xs1 = qkv.stride(1), ps0 = positions.stride(0), ps1 = positions.stride(1);
  const int64_t ks0 = k_pool.stride(0), ks1 = k_pool.stride(1), ks2 = k_pool.stride(2);
  const int64_t vs0 = v_pool.stride(0), vs1 = v_pool.stride(1), vs2 = v_pool.stride(2);
  const int64_t ts0 = tables.stride(0), n_table = tables.size(1);
  auto rotate = [&](const T* x, const float* c, const float* s, T* dst) {
    if (!c) {
      std::copy(x, x + D, dst);
      return;
    }
    for (int64_t i = 0; i < D; ++i) {
      const float xi = to_float(x[i]);
      const float other = i < half ? -to_float(x[i + half]) : to_float(x[i - half]);  // rotate_half(x)[i]
      dst[i] = from_float<T>(xi * c[i] + other * s[i]);
    }
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t pos = pp[b * ps0 + t * ps1];
      TORCH_CHECK(pos >= 0 && pos < n_table * BS, "rope_kv_write: position ", pos, " does not fit the block table");
      TORCH_CHECK(!cos || pos < n_rope, "rope_kv_write: position ", pos, " is past the RoPE table");
      const float* c = cos ? cos + pos * D : nullptr;
      const float* s = sin ? sin + pos * D : nullptr;
      const T* x = px + b * xs0 + t * xs1;
      for (int64_t h = 0; h < H; ++h) rotate(x + h * D, c, s, pq + ((b * T_ + t) * H + h) * D);
      const int64_t block = pt[b * ts0 + pos / BS], off = pos % BS;
      for (int64_t h = 0; h < Hkv; ++h) {
        rotate(x + (H + h) * D, c, s, pk + block * ks0 + h * ks1 + off * ks2);
        const T* v = x + (H + Hkv + h) * D;
        std::copy(v, v + D, pv + block * vs0 + h * vs1 + off * vs2);
      }
    }
}

template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t M, int64_t K, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    T* yr = y + m * K;
    float ss = 0.f;
    int64_t k = 0;
#ifdef MC_AVX512
    if (!portable()) {
      __m512 acc = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) {
        const __m512 v = load16(xr + k);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
    }
#endif
#ifdef MC_AVX2
    if (!portable()) {
      __m256 acc = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        const __m256 v = load8(xr + k);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      ss = hsum8(acc);
    }
#endif
    for (; k < K; ++k) ss += to_float(xr[k]) * to_float(xr[k]);
    const float r = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
    // As the model's RMSNorm: normalize in float32, round to the input dtype, then scale by the weight.
    for (k = 0; k < K; ++k) yr[k] = from_float<T>(to_float(w[k]) * to_float(from_float<T>(to_float(xr[k]) * r)));
  }
}

template <typename T>
void silu_mul_rows(const T* x, T* y, int64_t M, int64_t I) {
  for (int64_t m = 0; m < M; ++m) {
    const T* g = x + m * 2 * I;
    const T* u = g + I;
    T* o = y + m * I;
    int64_t i = 0;
#ifdef MC_AVX512
    if (!portable()) {
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= I; i += 16) {
        const __m512 vg = load16(g + i);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_max_ps(vg, _mm512_set1_ps(-87.f))));
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, _mm512_mul_ps(_mm512_div_ps(vg, _mm512_add_ps(one, e)), load16(u + i)));
        for (int j = 0; j < 16; ++j) o[i + j] = from_float<T>(tmp[j]);
      }
    }
#endif
#ifdef MC_AVX2
    if (!portable()) {
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 vg = load8(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_max_ps(vg, _mm256_set1_ps(-87.f))));
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, _mm256_mul_ps(_mm256_div_ps(vg, _mm256_add_ps(one, e)), load8(u + i)));
        for (int j = 0; j < 8; ++j) o[i + j] = from_float<T>(tmp[j]);
      }
    }
#endif
    for (; i < I; ++i) {
      const float vg = to_float(g[i]);
      o[i] = from_float<T>(vg / (1.f + std::exp(-vg)) * to_float(u[i]));
    }
  }
}

#define MC_DISPATCH_FLOAT(dtype, name, ...)                                                  \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, [&] { using T = float; __VA_ARGS__(); }) \
                                      AT_DISPATCH_CASE(at::kBFloat16, [&] { using T = at::BFloat16; __VA_ARGS__(); }))

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& block_tables, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "decode_attention: q (B, n_head, head_dim), k_pool and v_pool (n_blocks, n_kv_head, block_size, head_dim)");
  TORCH_CHECK(q.size(2) == k_pool.size(3) && q.size(1) % k_pool.size(1) == 0, "decode_attention: heads do not fit");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && v_pool.scalar_type() == k_pool.scalar_type(),
              "decode_attention: q, k_pool and v_pool must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_pool.stride(3) == 1 && v_pool.stride(3) == 1,
              "decode_attention: head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && lengths.scalar_type() == at::kInt &&
                  block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && lengths.numel() == q.size(0),
              "decode_attention: block_tables int32 (B, max_blocks) and lengths int32 (B,)");
  const at::Tensor tables = block_tables.contiguous(), lens = lengths.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  MC_DISPATCH_FLOAT(q.scalar_type(), "decode_attention",
                    [&] {
                      if (portable())
                        attend<T, false>(q, k_pool, v_pool, tables, lens, static_cast<float>(scale), out);
                      else
                        attend<T, true>(q, k_pool, v_pool, tables, lens, static_cast<float>(scale), out);
                    });
  return out;
}

at::Tensor rope_kv_write(const at::Tensor& qkv_in, const at::Tensor& positions, const c10::optional<at::Tensor>& cos,
                         const c10::optional<at::Tensor>& sin, at::Tensor k_pool, at::Tensor v_pool,
                         const at::Tensor& block_tables, int64_t n_head, int64_t n_kv_head) {
  TORCH_CHECK(qkv_in.dim() == 3 && positions.dim() == 2 && positions.size(0) == qkv_in.size(0) &&
                  positions.size(1) == qkv_in.size(1) && positions.scalar_type() == at::kLong,
              "rope_kv_write: qkv (B, T, (n_head + 2 n_kv_head) head_dim), positions int64 (B, T)");
  const int64_t D = k_pool.size(3);
  TORCH_CHECK(qkv_in.size(2) == (n_head + 2 * n_kv_head) * D && k_pool.size(1) == n_kv_head &&
                  v_pool.sizes() == k_pool.sizes(),
              "rope_kv_write: shapes do not fit");
  TORCH_CHECK(qkv_in.scalar_type() == k_pool.scalar_type() && v_pool.scalar_type() == k_pool.scalar_type(),
              "rope_kv_write: qkv and the pools must share a dtype");
  TORCH_CHECK(k_pool.stride(3) == 1 && v_pool.stride(3) == 1, "rope_kv_write: head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == qkv_in.size(0),
              "rope_kv_write: block_tables int32 (B, max_blocks)");
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  const bool rope = cos.has_value() && cos->defined();
  at::Tensor c, s;
  if (rope) {
    c = cos->to(at::kFloat).contiguous();
    s = sin.value().to(at::kFloat).contiguous();
    TORCH_CHECK(c.dim() == 2 && c.size(1) == D && s.sizes() == c.sizes(), "rope_kv_write: cos/sin (positions, head_dim)");
  }
  at::Tensor q = at::empty({qkv.size(0), qkv.size(1), n_head, D}, qkv.options());
  MC_DISPATCH_FLOAT(qkv.scalar_type(), "rope_kv_write", [&] {
    rope_write<T>(qkv, positions, rope ? c.data_ptr<float>() : nullptr, rope ? s.data_ptr<float>() : nullptr,
                  rope ? c.size(0) : 0, k_pool,
                  v_pool, block_tables, n_head, n_kv_head, q);
  });
  return q;
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type() && weight.dim() == 1 && weight.size(0) == x_in.size(-1),
              "rms_norm: weight (dim,) of the input's dtype");
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t K = x.size(-1), M = x.numel() / K;
  MC_DISPATCH_FLOAT(x.scalar_type(), "rms_norm",
                    [&] { rms_rows<T>(x.data_ptr<T>(), w.data_ptr<T>(), y.data_ptr<T>(), M, K, static_cast<float>(eps)); });
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  const at::Tensor x = gate_up.contiguous();
  const int64_t two_i = x.size(-1);
  TORCH_CHECK(two_i % 2 == 0, "silu_mul: the last dim holds gate then up, so it must be even");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = two_i / 2;
  at::Tensor y = at::empty(shape, x.options());
  MC_DISPATCH_FLOAT(x.scalar_type(), "silu_mul",
                    [&] { silu_mul_rows<T>(x.data_ptr<T>(), y.data_ptr<T>(), x.numel() / two_i, two_i / 2); });
  return y;
}

namespace {

// The first index of row x's maximum, NaN counting as the greatest (torch.argmax's rule).
int64_t first_argmax(const float* x, int64_t V) {
#ifdef MC_AVX512
  if (!portable()) {
    const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 best = minus_inf;
    __mmask16 nan = 0;
    for (int64_t i = 0; i < V; i += 16) {
      const __m512 v = _mm512_mask_loadu_ps(minus_inf, tail_mask(V - i), x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_max_ps(best, v);
    }
    if (nan == 0) {
      const __m512 target = _mm512_set1_ps(_mm512_reduce_max_ps(best));
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 k = tail_mask(V - i);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, x + i), target, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
      }
    }  // a NaN somewhere (rare): the scalar loop below finds the first one
  }
#endif
  int64_t index = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > x[index]) index = j;
  }
  return index;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "row_argmax: float32 logits (rows, vocabulary) with a non-empty vocabulary");
  const at::Tensor x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor values = at::empty({B}, x.options()), indices = at::empty({B}, x.options().dtype(at::kLong));
  const float* px = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = first_argmax(px + b * V, V);
    indices.data_ptr<int64_t>()[b] = i;
    values.data_ptr<float>()[b] = px[b * V + i];
  }
  return {values, indices};
}

}  // namespace mini_claude
