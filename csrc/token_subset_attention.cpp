// pypeft::token_subset_attention, for every backend at once (ATen ops only).
//
// Forward: every query attends exactly as scaled_dot_product_attention
// (enable_gqa) does. Without dropout it *is* that call, so it gets torch's
// fused kernels. With dropout the probabilities must carry counter_dropout's
// mask (row (b * Hq + h) * T + t, column s) so that backward can regenerate
// it for the selected queries alone; then P is formed explicitly, in chunks of
// query tokens that bound the [B, Hq, n, S] temporaries.
//
// Backward: only the k selected query rows are recomputed (scores, softmax,
// dropout mask); grad_key / grad_value gather what those rows send to every
// key token, grad_query is zero at the unselected tokens. Low-precision inputs
// are computed in float32: the softmax and its backward's row sums cancel.
//
// Fully masked query rows (every key masked, e.g. left padding under a causal
// mask) give zero output, as SDPA's safe softmax does, and zero gradients:
// their probabilities are the constant 0.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "pypeft/op_handles.h"
#include "pypeft/token_subset.h"
#include "pypeft/token_subset_attention.h"

namespace pypeft {
namespace {

constexpr const char* kOp = "pypeft.token_subset_attention";
constexpr const char* kBackwardOp = "pypeft.token_subset_attention_backward";

// Elements of one [B, Hq, n, S] temporary in the forward with dropout (a few
// live at once): 16 MiB each in float32.
constexpr int64_t kChunkElements = int64_t{1} << 22;

using Tensor = at::Tensor;
using OptTensor = c10::optional<Tensor>;

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// What every row computation reads; key and value in the compute dtype.
struct Attention {
  AttentionDims d;
  Tensor key;   // [B, Hkv, S, D]
  Tensor value; // [B, Hkv, S, Dv]
  Tensor mask;  // [1|B, 1|Hq, 1|T, 1|S] (leading dims added), or undefined
  double scale;
  bool is_causal;
  double dropout_p;
  OptTensor seed;
};

// The mask with leading dims of size 1 up to [., ., T, S] (or None):
// broadcasting as before, and SDPA's CPU kernels reject a 1-D mask.
OptTensor mask_4d(const OptTensor& attn_mask) {
  if (!has_value(attn_mask)) return c10::nullopt;
  Tensor mask = *attn_mask;
  while (mask.dim() < 4) mask = mask.unsqueeze(0);
  return mask;
}

Attention prepare(const AttentionDims& d, const Tensor& key, const Tensor& value,
                  const OptTensor& attn_mask, double scale, bool is_causal, double dropout_p,
                  const OptTensor& seed) {
  const auto dtype = compute_dtype(key.scalar_type());
  const Tensor mask = mask_4d(attn_mask).value_or(Tensor());
  return {d, key.to(dtype), value.to(dtype), mask, scale, is_causal, dropout_p, seed};
}

// [B, Hq, n, X] as [B, Hkv, G * n, X] and back: query head h = hkv * G + g
// uses K/V head hkv (as enable_gqa), so one batched matmul per K/V head serves
// its G query heads without repeating K and V.
Tensor by_kv_head(const Tensor& t, const AttentionDims& d) {
  return t.reshape({d.batch, d.kv_heads, d.groups() * t.size(2), t.size(3)});
}
Tensor by_q_head(const Tensor& t, const AttentionDims& d) {
  return t.reshape({d.batch, d.q_heads, t.size(2) / d.groups(), t.size(3)});
}

// x [B', H, T, X] at the selected tokens: [B, H, k, X] (B' = 1 broadcasts).
Tensor gather_tokens(const Tensor& x, const Tensor& positions) {
  const int64_t B = positions.size(0), k = positions.size(1);
  const Tensor xb = x.expand({B, x.size(1), x.size(2), x.size(3)});
  return xb.gather(2, positions.view({B, 1, k, 1}).expand({B, x.size(1), k, x.size(3)}));
}

// A [B, H, T, X] tensor of zeros holding rows [B, H, k, X] at the selected tokens.
Tensor scatter_tokens(const Tensor& rows, const Tensor& positions, int64_t tokens) {
  const int64_t B = rows.size(0), H = rows.size(1), k = rows.size(2), X = rows.size(3);
  return at::zeros({B, H, tokens, X}, rows.options())
      .scatter_(2, positions.view({B, 1, k, 1}).expand({B, H, k, X}), rows);
}

// Softmax probabilities [B, Hq, n, S] (no dropout) of the query rows q
// [B, Hq, n, D] (compute dtype) sitting at token indices `tokens` [1|B, n];
// mask_rows: the mask at those tokens ([1|B, 1|Hq, 1|n, 1|S]) or undefined.
Tensor probabilities(const Attention& a, const Tensor& q, const Tensor& tokens,
                     const Tensor& mask_rows) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // The scale goes on q (n × D values), not on the scores (n × S).
  Tensor scores = by_q_head(at::matmul(by_kv_head(q * a.scale, a.d), a.key.transpose(-2, -1)), a.d);
  if (mask_rows.defined()) {
    if (mask_rows.scalar_type() == at::kBool)
      scores.masked_fill_(mask_rows.logical_not(), -kInf);
    else
      scores.add_(mask_rows);
  }
  if (a.is_causal) {  // top-left aligned, as SDPA: query t sees keys s <= t
    const Tensor future = tokens.unsqueeze(-1) < at::arange(a.d.keys, tokens.options());
    scores.masked_fill_(future.unsqueeze(1), -kInf);
  }
  // Rows with every key masked come out as zeros (SDPA's choice), not NaN.
  // Only a mask can mask a whole row (a causal row sees key 0 at least), and
  // the plain softmax is a fraction of the safe one's cost (it tests every
  // row for all -inf): on the CPU the safe one was a fifth of TokenTune's
  // attention forward.
  return mask_rows.defined() ? at::_safe_softmax(scores, -1) : scores.softmax(-1);
}

// counter_dropout on probabilities [B, Hq, n, S] of the queries at `tokens`
// [1|B, n]: row (b * Hq + h) * T + t, so a row is masked alike in forward and
// backward whichever rows are computed together.
Tensor dropped(const Attention& a, const Tensor& probs, const Tensor& tokens) {
  // No keys (S = 0): nothing to mask, and counter_dropout counts no rows then.
  if (probs.numel() == 0) return probs;
  const auto& d = a.d;
  const auto opts = tokens.options();
  const Tensor head_rows = (at::arange(d.batch, opts).mul_(d.q_heads).unsqueeze(1) +
                            at::arange(d.q_heads, opts).unsqueeze(0))
                               .mul_(d.tokens);  // [B, Hq]: row of token 0
  const Tensor row_ids = (head_rows.unsqueeze(2) + tokens.unsqueeze(1)).reshape({-1});
  return ops::counter_dropout().call(probs, a.dropout_p, a.seed, row_ids);
}

// The explicit forward (with dropout), query tokens in chunks, written into out.
void attention_with_dropout(const Attention& a, const Tensor& query, const Tensor& out) {
  const auto& d = a.d;
  const int64_t per_token = std::max<int64_t>(1, d.batch * d.q_heads * d.keys);
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / per_token);
  const auto dtype = a.key.scalar_type();
  for (int64_t t0 = 0; t0 < d.tokens; t0 += chunk) {
    const int64_t n = std::min(chunk, d.tokens - t0);
    const Tensor tokens = at::arange(t0, t0 + n, query.options().dtype(at::kLong)).unsqueeze(0);
    Tensor mask_rows;
    if (a.mask.defined()) mask_rows = a.mask.size(2) == 1 ? a.mask : a.mask.narrow(2, t0, n);
    const Tensor q = query.narrow(2, t0, n).to(dtype);
    const Tensor probs = dropped(a, probabilities(a, q, tokens, mask_rows), tokens);
    out.narrow(2, t0, n).copy_(by_q_head(at::matmul(by_kv_head(probs, d), a.value), d));
  }
}

std::tuple<Tensor, Tensor> token_subset_attention(const Tensor& query, const Tensor& key,
                                                  const Tensor& value, const OptTensor& attn_mask,
                                                  double scale, bool is_causal, double dropout_p,
                                                  const OptTensor& seed,
                                                  const Tensor& positions) {
  check_dim(kOp, "query", query, 4);
  const auto d = check_token_subset_attention_args(kOp, "query", query, query.size(2), key, value,
                                                   attn_mask, scale, is_causal, dropout_p, seed);
  check_positions(kOp, positions, "query", query, 0, 2, /*check_values=*/true);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor query_rows = gather_tokens(query, positions);
  // Memory laid out as [B, T, Hq, Dv]: transformers' attention interface
  // transposes the output to that next, which is then free.
  Tensor out = at::empty({d.batch, d.tokens, d.q_heads, d.value_dim}, query.options())
                   .transpose(1, 2);
  if (dropout_p == 0.0) {
    const Tensor sdpa = at::scaled_dot_product_attention(
        query, key, value, mask_4d(attn_mask), 0.0, is_causal, scale, /*enable_gqa=*/true);
    if (sdpa.strides() == out.strides()) return {sdpa, query_rows};
    out.copy_(sdpa);
  } else {
    attention_with_dropout(prepare(d, key, value, attn_mask, scale, is_causal, dropout_p, seed),
                           query, out);
  }
  return {out, query_rows};
}

std::tuple<Tensor, Tensor, Tensor> token_subset_attention_backward(
    const Tensor& grad_out, const Tensor& query_rows, const Tensor& key, const Tensor& value,
    const OptTensor& attn_mask, double scale, bool is_causal, double dropout_p,
    const OptTensor& seed, const Tensor& positions, std::array<bool, 3> output_mask) {
  check_dim(kBackwardOp, "grad_out", grad_out, 4);
  const auto d =
      check_token_subset_attention_args(kBackwardOp, "query_rows", query_rows, grad_out.size(2),
                                        key, value, attn_mask, scale, is_causal, dropout_p, seed);
  const auto sub = check_positions(kBackwardOp, positions, "grad_out", grad_out, 0, 2,
                                   /*check_values=*/false);
  check_size(kBackwardOp, "grad_out", grad_out, 0, d.batch, "batch B, from query_rows");
  check_size(kBackwardOp, "grad_out", grad_out, 1, d.q_heads, "query heads Hq, from query_rows");
  check_size(kBackwardOp, "grad_out", grad_out, 3, d.value_dim, "value dim Dv, from value");
  check_same_dtype(kBackwardOp, "grad_out", grad_out, "query_rows", query_rows);
  check_same_device(kBackwardOp, "grad_out", grad_out, "query_rows", query_rows);
  check_size(kBackwardOp, "query_rows", query_rows, 2, sub.k,
             "selected tokens k, from positions [B, k]");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [need_query, need_key, need_value] = output_mask;
  Tensor grad_query, grad_key, grad_value;
  if (!need_query && !need_key && !need_value) return {grad_query, grad_key, grad_value};

  const Attention a = prepare(d, key, value, attn_mask, scale, is_causal, dropout_p, seed);
  const auto dtype = a.key.scalar_type();
  const Tensor q = query_rows.to(dtype);
  const Tensor grad_rows = gather_tokens(grad_out, positions).to(dtype);  // [B, Hq, k, Dv]
  Tensor mask_rows;
  if (a.mask.defined())
    mask_rows = a.mask.size(2) == 1 ? a.mask : gather_tokens(a.mask, positions);
  const Tensor probs = probabilities(a, q, positions, mask_rows);
  const bool drop = dropout_p > 0.0;
  if (need_value) {
    const Tensor kept = drop ? dropped(a, probs, positions) : probs;
    grad_value = at::matmul(by_kv_head(kept, d).transpose(-2, -1), by_kv_head(grad_rows, d))
                     .to(value.scalar_type());
  }
  if (need_query || need_key) {
    Tensor grad_probs =
        by_q_head(at::matmul(by_kv_head(grad_rows, d), a.value.transpose(-2, -1)), d);
    if (drop) grad_probs = dropped(a, grad_probs, positions);  // the same mask and 1 / (1 - p)
    // P ⊙ (dP − rowsum(dP ⊙ P)), times scale (the scores' factor, for q and k alike).
    const Tensor grad_scores = at::_softmax_backward_data(grad_probs, probs, -1, dtype).mul_(scale);
    if (need_query) {
      const Tensor rows = by_q_head(at::matmul(by_kv_head(grad_scores, d), a.key), d);
      grad_query = scatter_tokens(rows.to(query_rows.scalar_type()), positions, d.tokens);
    }
    if (need_key)
      grad_key = at::matmul(by_kv_head(grad_scores, d).transpose(-2, -1), by_kv_head(q, d))
                     .to(key.scalar_type());
  }
  return {grad_query, grad_key, grad_value};
}

}  // namespace

// Backend-generic: ATen's GEMMs and softmax, and counter_dropout's kernels.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("token_subset_attention", &token_subset_attention);
  m.impl("token_subset_attention_backward", &token_subset_attention_backward);
}

}  // namespace pypeft
