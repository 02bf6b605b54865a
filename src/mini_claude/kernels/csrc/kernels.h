// Shared declarations of Mini-Claude's CPU kernels (see mini_claude/kernels/__init__.py for the design).
//
// Every kernel has two implementations of the same arithmetic: a vector one, compiled for the build machine
// (the extension is built with -march=native on the machine that runs it): AVX-512 F/BW/VL where it exists,
// else AVX2 + FMA for the low-bit linear layers; and a portable C++ one. `set_portable(true)` forces the portable one at run time, so tests can compare the two on
// any CPU. Integer parts are exact in both; float sums may differ in their order (a few ulps).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MC_AVX512 1
#include <immintrin.h>
// The lanes of a 16-float vector that hold one of the `left` elements still to do.
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Most x86-64 CPUs without AVX-512 (Zen 1-3, client Intel): the low-bit kernels' integer dot products map to
// vpmaddwd on 256-bit vectors, the same exact int16 x int16 -> int32 pair sums that vpdpwssd computes.
#define MC_AVX2 1
#include <immintrin.h>
#endif

namespace mini_claude {

// Runs fn(begin, end) over [0, n) in chunks of `chunk`, on the calling thread and the pool's helpers
// (at::get_num_threads() in all); never waits for a helper that has not started (see pool.cpp).
void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

bool portable();
void set_portable(bool on);
std::string isa();  // which implementation runs: "avx512-vnni", "avx512", "avx2" or "portable"

// Low-bit linear layers (lowbit.cpp). Weights are packed by quantize.py into tiles of 4 output rows, pairs of
// 32-weight blocks along the input dimension; see pack_int4 / pack_int8 there for the exact layout.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias, int64_t out_features,
                     c10::optional<at::ScalarType> out_dtype);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t out_features,
                     c10::optional<at::ScalarType> out_dtype);
// The activation quantization the linear kernels run first, exposed for tests: (q int16 (M, P*64) in the
// kernels' pair layout, block sums float (M, 2P), row scales float (M,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x, int64_t pairs);

// Decode-step kernels (decode.cpp).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& block_tables, const at::Tensor& lengths, double scale);
at::Tensor rope_kv_write(const at::Tensor& qkv, const at::Tensor& positions, const c10::optional<at::Tensor>& cos,
                         const c10::optional<at::Tensor>& sin, at::Tensor k_pool, at::Tensor v_pool,
                         const at::Tensor& block_tables, int64_t n_head, int64_t n_kv_head);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
// Each row's maximum and the first index of it (NaN counts as the greatest, as in torch.argmax), in one
// single-threaded pass: torch's reductions over a 49k vocabulary cost 50-70 us here (a wake-up of its OpenMP
// threads; an argmax that is not vectorized), where this takes a few.
std::tuple<at::Tensor, at::Tensor> row_argmax(const at::Tensor& logits);

// One decode step through all blocks of a Llama-style model (stack.cpp): Python builds it from the model's
// layers (model.py, Transformer.decode_stack) and calls `forward` once per step instead of ~10 calls per block.
struct StackLinear {
  enum Kind : int64_t { kDense = 0, kQ4 = 1, kQ8 = 2 };
  int64_t kind = kDense;
  at::Tensor weight;                // dense (out, in) weight, or the packed qweight
  at::Tensor scales, mins;          // low-bit only (mins: int4 only)
  c10::optional<at::Tensor> bias;
  at::Tensor dense;                 // int4 only, optional: the dense copy used above `dense_rows` input rows
  int64_t in_features = 0, out_features = 0, dense_rows = 0;
  at::Tensor operator()(const at::Tensor& x) const;
};

class DecodeStack {
 public:
  // Per block, in order: linears qkv, o, gate_up, down and norms input, post-attention.
  DecodeStack(std::vector<StackLinear> linears, std::vector<at::Tensor> norms, double eps, int64_t n_head,
              int64_t n_kv_head, int64_t head_dim, double scale);
  // x (B, 1, dim) -> the residual stream after the last block; the pools are each block's cache, as
  // rope_kv_write and decode_attention take them.
  at::Tensor forward(at::Tensor x, const at::Tensor& positions, const c10::optional<at::Tensor>& cos,
                     const c10::optional<at::Tensor>& sin, const std::vector<at::Tensor>& k_pools,
                     const std::vector<at::Tensor>& v_pools, const at::Tensor& block_tables,
                     const at::Tensor& lengths) const;
  int64_t layers() const { return static_cast<int64_t>(norms_.size() / 2); }

 private:
  std::vector<StackLinear> linears_;
  std::vector<at::Tensor> norms_;
  double eps_;
  int64_t n_head_, n_kv_head_, head_dim_;
  double scale_;
};

// float <-> bfloat16 / half, bit-exact with torch's conversions (round to nearest even).
inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
inline float to_float(T v);
template <>
inline float to_float<float>(float v) {
  return v;
}
template <>
inline float to_float<at::BFloat16>(at::BFloat16 v) {
  return bf16_to_float(v.x);
}
template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline at::BFloat16 from_float<at::BFloat16>(float v) {
  at::BFloat16 b;
  b.x = float_to_bf16(v);
  return b;
}

#ifdef MC_AVX2
// 8 floats from float32 or bfloat16 (bfloat16 is the top half of a float32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The sum of a vector's 8 floats.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

}  // namespace mini_claude
