// One decode step through every block of the model in one call: the same kernels, in the same order, with the
// same arguments as `model.py`'s Block.forward -> Attention._decode -> MLP.forward on the decode path, so the
// result is bit for bit the Python path's (tests/test_decode_stack.py checks it). What it removes is the
// Python around them: a Llama block is ~10 kernel calls wrapped in ~9 nn.Module calls, attribute lookups and
// temporaries, ~5 ms per token for the bundled model's 30 blocks on this class of CPU, as much as the
// kernels' own work. model.py stays the definition (and the path for prefill, training, LoRA and study);
// `Transformer._decode_step` hands a step to this only while the model is exactly what the stack was made from.
#include <ATen/ATen.h>

#include "kernels.h"

namespace mini_claude {

at::Tensor StackLinear::operator()(const at::Tensor& x) const {
  switch (kind) {
    case kQ4:
      if (dense.defined() && x.numel() > dense_rows * in_features) {
        c10::optional<at::Tensor> b;
        if (bias) b = bias->to(dense.scalar_type());
        return at::linear(x.to(dense.scalar_type()), dense, b).to(x.scalar_type());
      }
      return q4_linear(x, weight, scales, mins, bias, out_features, c10::nullopt);
    case kQ8:
      return q8_linear(x, weight, scales, bias, out_features, c10::nullopt);
    default:
      return at::linear(x, weight, bias);
  }
}

DecodeStack::DecodeStack(std::vector<StackLinear> linears, std::vector<at::Tensor> norms, double eps, int64_t n_head,
                         int64_t n_kv_head, int64_t head_dim, double scale)
    : linears_(std::move(linears)), norms_(std::move(norms)), eps_(eps), n_head_(n_head), n_kv_head_(n_kv_head),
      head_dim_(head_dim), scale_(scale) {
  TORCH_CHECK(linears_.size() % 4 == 0 && norms_.size() * 2 == linears_.size(),
              "DecodeStack: 4 linear layers (qkv, o, gate_up, down) and 2 norms per block");
}

at::Tensor DecodeStack::forward(at::Tensor x, const at::Tensor& positions, const c10::optional<at::Tensor>& cos,
                                const c10::optional<at::Tensor>& sin, const std::vector<at::Tensor>& k_pools,
                                const std::vector<at::Tensor>& v_pools, const at::Tensor& block_tables,
                                const at::Tensor& lengths) const {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "DecodeStack: x is (B, 1, dim), one new token per row");
  TORCH_CHECK(static_cast<int64_t>(k_pools.size()) == layers() && v_pools.size() == k_pools.size(),
              "DecodeStack: one key pool and one value pool per block");
  const int64_t B = x.size(0);
  for (int64_t l = 0; l < layers(); ++l) {
    const StackLinear* lin = &linears_[4 * l];
    const at::Tensor &k_pool = k_pools[l], &v_pool = v_pools[l];
    // x + self_attn(input_layernorm(x))
    const at::Tensor qkv = lin[0](rms_norm(x, norms_[2 * l], eps_));
    const at::Tensor q = rope_kv_write(qkv, positions, cos, sin, k_pool, v_pool, block_tables, n_head_, n_kv_head_);
    const at::Tensor y = decode_attention(q.view({B, n_head_, head_dim_}), k_pool, v_pool, block_tables, lengths, scale_);
    x = x + lin[1](y.view({B, 1, n_head_ * head_dim_}));
    // x + mlp(post_attention_layernorm(x))
    x = x + lin[3](silu_mul(lin[2](rms_norm(x, norms_[2 * l + 1], eps_))));
  }
  return x;
}

}  // namespace mini_claude
