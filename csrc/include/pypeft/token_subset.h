// What every TokenTune (token-subset) op shares: checking the positions of the
// selected tokens, and moving between all rows of x and the selected rows.
//
// x's leading dims are [B, T] (batch, tokens); positions [B, k] holds, per
// batch row, k distinct token indices. The selected rows of x viewed as
// [B * T, F] are the flat rows b * T + positions[b, j], in positions' order.
#pragma once

#include <ATen/ATen.h>

#include "pypeft/checks.h"

namespace pypeft {

struct TokenSubsetDims {
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t k;       // selected tokens per batch row
};

// Shape, dtype and device of positions against x, whose dims batch_dim and
// token_dim are B and T. With check_values (forward ops), also that every
// position is in [0, T) and distinct within its row: a duplicate would count
// a token's gradient twice. That check reads the values (a device sync on CUDA).
inline TokenSubsetDims check_positions(const char* op, const at::Tensor& positions,
                                       const char* x_arg, const at::Tensor& x, int64_t batch_dim,
                                       int64_t token_dim, bool check_values) {
  check_defined(op, x_arg, x);
  PYPEFT_CHECK_VALUE(x.dim() > std::max(batch_dim, token_dim), op, x_arg,
                     "a tensor with batch and token dims " + std::to_string(batch_dim) + " and " +
                         std::to_string(token_dim),
                     "shape " + shape_str(x.sizes()));
  check_dim(op, "positions", positions, 2);
  PYPEFT_CHECK_TYPE(positions.scalar_type() == at::kLong, op, "positions", "an int64 tensor",
                    c10::toString(positions.scalar_type()));
  check_same_device(op, "positions", positions, x_arg, x);
  const int64_t B = x.size(batch_dim), T = x.size(token_dim), k = positions.size(1);
  PYPEFT_CHECK_VALUE(positions.size(0) == B, op, "positions",
                     "[B, k] with B = " + std::to_string(B) + " (the batch of '" + x_arg + "')",
                     "shape " + shape_str(positions.sizes()));
  PYPEFT_CHECK_VALUE(k <= T, op, "positions",
                     "at most " + std::to_string(T) + " positions per row (the tokens of '" +
                         x_arg + "')",
                     std::to_string(k));
  if (check_values && positions.numel() > 0) {
    const auto [lo, hi] = at::aminmax(positions);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    PYPEFT_CHECK_VALUE(lo_v >= 0 && hi_v < T, op, "positions",
                       "token indices in [0, " + std::to_string(T) + ")",
                       "values in [" + std::to_string(lo_v) + ", " + std::to_string(hi_v) + "]");
    if (k > 1) {
      const at::Tensor sorted = std::get<0>(positions.sort(1));
      const bool distinct = (sorted.narrow(1, 1, k - 1) != sorted.narrow(1, 0, k - 1)).all().item<bool>();
      PYPEFT_CHECK_VALUE(distinct, op, "positions", "distinct token indices in each row",
                         "a repeated index");
    }
  }
  return {B, T, k};
}

// [B * k] flat row indices b * T + positions[b, j] into x viewed as [B * T, ...].
inline at::Tensor flat_rows(const at::Tensor& positions, int64_t tokens) {
  const int64_t B = positions.size(0);
  const at::Tensor base = at::arange(B, positions.options()).mul_(tokens).unsqueeze(1);
  return (positions + base).reshape({-1});
}

// The selected rows of x ([B, T, ...] viewed as [B * T, F]) as a [B * k, F] tensor.
inline at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& rows) {
  const int64_t n = x.size(0) * x.size(1);
  // F spelled out: reshape({0, -1}) of an empty batch is ambiguous and throws.
  int64_t features = 1;
  for (int64_t d = 2; d < x.dim(); ++d) features *= x.size(d);
  return x.reshape({n, features}).index_select(0, rows);
}

// A [B, T, ...] tensor (shape `shape`) of zeros holding rows_values at `rows`.
inline at::Tensor scatter_rows(const at::Tensor& rows_values, const at::Tensor& rows,
                               at::IntArrayRef shape) {
  at::Tensor out = at::zeros({shape[0] * shape[1], rows_values.size(1)}, rows_values.options());
  out.index_copy_(0, rows, rows_values);
  return out.view(shape);
}

}  // namespace pypeft
