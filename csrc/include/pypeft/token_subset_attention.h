// pypeft::token_subset_attention — argument validation (shared by the forward
// and backward ops, on every backend).
//
// Layout of transformers' attention interface: query [B, Hq, T, D], key
// [B, Hkv, S, D], value [B, Hkv, S, Dv], Hq a multiple of Hkv. attn_mask: None,
// bool or of query's dtype, broadcastable to [B, Hq, T, S] (as
// torch.nn.functional.scaled_dot_product_attention accepts it).
// dtypes: query, key, value share one of float32, float64, bfloat16 (float16
// too on CUDA).
#pragma once

#include <cmath>

#include "pypeft/checks.h"

namespace pypeft {

struct AttentionDims {
  int64_t batch;     // B
  int64_t q_heads;   // Hq
  int64_t kv_heads;  // Hkv
  int64_t tokens;    // T (queries)
  int64_t keys;      // S
  int64_t head_dim;  // D
  int64_t value_dim; // Dv
  int64_t groups() const { return q_heads / kv_heads; }
};

// `queries` is query (forward) or query_rows (backward): it gives B, Hq and D.
// T comes from the caller (query.size(2), or grad_out's in backward).
inline AttentionDims check_token_subset_attention_args(
    const char* op, const char* q_arg, const at::Tensor& queries, int64_t tokens,
    const at::Tensor& key, const at::Tensor& value, const c10::optional<at::Tensor>& attn_mask,
    double scale, bool is_causal, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_dim(op, q_arg, queries, 4);
  check_dim(op, "key", key, 4);
  check_dim(op, "value", value, 4);
  check_activation_dtype(op, q_arg, queries);
  check_same_dtype(op, "key", key, q_arg, queries);
  check_same_dtype(op, "value", value, q_arg, queries);
  check_same_device(op, "key", key, q_arg, queries);
  check_same_device(op, "value", value, q_arg, queries);
  const AttentionDims d{queries.size(0), queries.size(1), key.size(1), tokens,
                        key.size(2),     queries.size(3), value.size(3)};
  check_size(op, "key", key, 0, d.batch, "batch B, from query [B, Hq, T, D]");
  PYPEFT_CHECK_VALUE(d.kv_heads > 0 && d.q_heads % d.kv_heads == 0, op, "key",
                     "a number of heads Hkv dividing query's Hq = " + std::to_string(d.q_heads) +
                         " (grouped K/V heads)",
                     "shape " + shape_str(key.sizes()));
  check_size(op, "key", key, 3, d.head_dim, "head dim D, from query [B, Hq, T, D]");
  check_size(op, "value", value, 0, d.batch, "batch B, from query [B, Hq, T, D]");
  check_size(op, "value", value, 1, d.kv_heads, "K/V heads Hkv, from key [B, Hkv, S, D]");
  check_size(op, "value", value, 2, d.keys, "key tokens S, from key [B, Hkv, S, D]");
  if (has_value(attn_mask)) {
    const at::Tensor& m = *attn_mask;
    PYPEFT_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == queries.scalar_type(), op,
                      "attn_mask",
                      std::string("dtype Bool or ") + c10::toString(queries.scalar_type()) +
                          " (the dtype of '" + q_arg + "')",
                      c10::toString(m.scalar_type()));
    check_same_device(op, "attn_mask", m, q_arg, queries);
    const int64_t full[4] = {d.batch, d.q_heads, d.tokens, d.keys};
    bool fits = m.dim() <= 4;
    for (int64_t i = 0; fits && i < m.dim(); ++i) {
      const int64_t size = m.size(m.dim() - 1 - i), want = full[3 - i];
      fits = size == 1 || size == want;
    }
    PYPEFT_CHECK_VALUE(fits, op, "attn_mask",
                       "a shape broadcastable to [B, Hq, T, S] = " + shape_str(full),
                       "shape " + shape_str(m.sizes()));
    // As scaled_dot_product_attention: two masks would be ambiguous.
    PYPEFT_CHECK_VALUE(!is_causal, op, "is_causal", "False when attn_mask is given",
                       "True together with an attn_mask");
  }
  PYPEFT_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, op, "scale", "a finite number > 0",
                     scale);
  check_probability(op, "dropout_p", dropout_p);
  check_seed(op, "seed", seed, dropout_p > 0.0, queries);
  return d;
}

}  // namespace pypeft
