// pypeft::lora_linear_mixed and pypeft::vera_linear_mixed — argument
// validation (shared by every backend).
//
// Mixed-adapter batches, for inference: row b of x [B, ..., in] runs with
// adapter k = row_adapter[b] in [0, K), or with the base layer alone when
// k == -1.
//
//   LoRA: y[b] = x[b] Wᵀ + b + scale[k] · (x[b] A_kᵀ) B_kᵀ
//         lora_a[k] [r_k, in], lora_b[k] [out, r_k]: each adapter its own rank.
//   VeRA: y[b] = x[b] Wᵀ + b + λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ)
//         A [r, max_in], B [max_out, r] shared, sliced as in vera_linear;
//         lambda_d [K, r], lambda_b [K, out] stack the adapters' vectors.
//
// dtypes: x, weight, bias as lora_linear (float32, float64, bfloat16; float16
// on CUDA). Each adapter's tensors share one dtype: x's, or float32 when x is
// bfloat16/float16; the adapter part is computed in that dtype and added to y
// in y's dtype.
//
// The frozen weight may be NF4 (weight_absmax given; lora_linear.h's
// BaseWeight): weight holds uint8 codes [out, in / 2], and the base rows
// equal pypeft.nf4_linear's.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "pypeft/checks.h"
#include "pypeft/lora_linear.h"

namespace pypeft {

struct MixedLinearDims {
  int64_t batch;     // x.size(0): one row_adapter entry per batch row
  int64_t in;
  int64_t out;
  int64_t adapters;  // K
};

// x [B, ..., in] (at least 2-D), weight [out, in] (or NF4 codes [out, in / 2]),
// bias [out] or None.
inline MixedLinearDims check_mixed_base_args(const char* op, const at::Tensor& x,
                                             const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias,
                                             const BaseWeight& base) {
  check_defined(op, "x", x);
  PYPEFT_CHECK_VALUE(x.dim() >= 2, op, "x",
                     "a tensor of shape [batch, ..., in_features] (at least 2-D: one adapter "
                     "per batch row)",
                     std::to_string(x.dim()) + "-D tensor of shape " + shape_str(x.sizes()));
  const int64_t in = check_linear_args(op, x, weight, bias, base);
  return MixedLinearDims{x.size(0), in, weight.size(0), 0};
}

// An adapter tensor's dtype: x's, or float32 beside bfloat16/float16 x.
inline void check_mixed_adapter_dtype(const char* op, const char* arg, const at::Tensor& t,
                                      const at::Tensor& x) {
  const bool low_precision_x = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  PYPEFT_CHECK_TYPE(t.scalar_type() == x.scalar_type() ||
                        (low_precision_x && t.scalar_type() == at::kFloat),
                    op, arg,
                    std::string("dtype ") + c10::toString(x.scalar_type()) + " (the dtype of 'x')" +
                        (low_precision_x ? " or float32" : ""),
                    c10::toString(t.scalar_type()));
}

// "name[k]", for the k-th tensor of a list argument. Appended piece by piece:
// `"[" + std::to_string(k)` draws a false -Wrestrict from GCC 12 at -O3.
inline std::string indexed_name(const char* name, int64_t k) {
  std::string s(name);
  s += '[';
  s += std::to_string(k);
  s += ']';
  return s;
}

// One entry per batch row, each in [-1, K).
inline void check_row_adapter(const char* op, at::IntArrayRef row_adapter, int64_t batch,
                              int64_t adapters) {
  PYPEFT_CHECK_VALUE(static_cast<int64_t>(row_adapter.size()) == batch, op, "row_adapter",
                     std::to_string(batch) + " entries (one per batch row, x.size(0))",
                     std::to_string(row_adapter.size()) + " entries");
  for (size_t b = 0; b < row_adapter.size(); ++b) {
    const int64_t k = row_adapter[b];
    PYPEFT_CHECK_VALUE(k >= -1 && k < adapters, op, "row_adapter",
                       "adapter indices in [-1, " + std::to_string(adapters) + ") (" +
                           std::to_string(adapters) + " adapters; -1: the base layer alone)",
                       "row_adapter[" + std::to_string(b) + "] = " + std::to_string(k));
  }
}

inline MixedLinearDims check_lora_linear_mixed_args(const char* op, const at::Tensor& x,
                                                    const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    at::TensorList lora_a, at::TensorList lora_b,
                                                    at::ArrayRef<double> scale,
                                                    at::IntArrayRef row_adapter,
                                                    const BaseWeight& base = {}) {
  auto dims = check_mixed_base_args(op, x, weight, bias, base);
  const int64_t k_adapters = static_cast<int64_t>(lora_a.size());
  PYPEFT_CHECK_VALUE(lora_b.size() == lora_a.size(), op, "lora_b",
                     std::to_string(k_adapters) + " tensors (one per adapter, as 'lora_a')",
                     std::to_string(lora_b.size()) + " tensors");
  PYPEFT_CHECK_VALUE(scale.size() == lora_a.size(), op, "scale",
                     std::to_string(k_adapters) + " numbers (one per adapter, as 'lora_a')",
                     std::to_string(scale.size()) + " numbers");
  for (int64_t k = 0; k < k_adapters; ++k) {
    const std::string a_name = indexed_name("lora_a", k), b_name = indexed_name("lora_b", k),
                      s_name = indexed_name("scale", k);
    const at::Tensor& a = lora_a[k];
    const at::Tensor& b = lora_b[k];
    check_dim(op, a_name.c_str(), a, 2);
    const int64_t r = a.size(0);
    PYPEFT_CHECK_VALUE(r >= 1, op, a_name, "shape [r, in_features] with rank r >= 1",
                       "shape " + shape_str(a.sizes()));
    check_size(op, a_name.c_str(), a, 1, dims.in, "in_features, from weight [out, in]");
    check_dim(op, b_name.c_str(), b, 2);
    check_size(op, b_name.c_str(), b, 0, dims.out, "out_features, from weight [out, in]");
    check_size(op, b_name.c_str(), b, 1, r, ("rank r, from " + a_name + " [r, in]").c_str());
    check_same_device(op, a_name.c_str(), a, "x", x);
    check_same_device(op, b_name.c_str(), b, "x", x);
    check_mixed_adapter_dtype(op, a_name.c_str(), a, x);
    check_same_dtype(op, b_name.c_str(), b, a_name.c_str(), a);
    PYPEFT_CHECK_VALUE(std::isfinite(scale[k]), op, s_name, "a finite number", scale[k]);
  }
  check_row_adapter(op, row_adapter, dims.batch, k_adapters);
  dims.adapters = k_adapters;
  return dims;
}

inline MixedLinearDims check_vera_linear_mixed_args(
    const char* op, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& vera_a, const at::Tensor& vera_b,
    const at::Tensor& lambda_d, const at::Tensor& lambda_b, at::IntArrayRef row_adapter,
    const BaseWeight& base = {}) {
  auto dims = check_mixed_base_args(op, x, weight, bias, base);
  check_dim(op, "vera_a", vera_a, 2);
  check_dim(op, "vera_b", vera_b, 2);
  const int64_t r = vera_a.size(0);
  PYPEFT_CHECK_VALUE(r >= 1, op, "vera_a", "shape [r, max_in] with rank r >= 1",
                     "shape " + shape_str(vera_a.sizes()));
  PYPEFT_CHECK_VALUE(vera_a.size(1) >= dims.in, op, "vera_a",
                     "shape [r, max_in] with max_in >= in_features " + std::to_string(dims.in) +
                         " (the shared matrix is sliced per layer)",
                     "shape " + shape_str(vera_a.sizes()));
  PYPEFT_CHECK_VALUE(vera_b.size(0) >= dims.out, op, "vera_b",
                     "shape [max_out, r] with max_out >= out_features " +
                         std::to_string(dims.out) + " (the shared matrix is sliced per layer)",
                     "shape " + shape_str(vera_b.sizes()));
  check_size(op, "vera_b", vera_b, 1, r, "rank r, from vera_a [r, max_in]");
  check_dim(op, "lambda_d", lambda_d, 2);
  const int64_t k_adapters = lambda_d.size(0);
  check_size(op, "lambda_d", lambda_d, 1, r, "rank r, from vera_a [r, max_in]");
  check_dim(op, "lambda_b", lambda_b, 2);
  check_size(op, "lambda_b", lambda_b, 0, k_adapters,
             "one row per adapter, as lambda_d [K, r]");
  check_size(op, "lambda_b", lambda_b, 1, dims.out, "out_features, from weight [out, in]");
  check_same_device(op, "vera_a", vera_a, "x", x);
  check_mixed_adapter_dtype(op, "vera_a", vera_a, x);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"vera_b", &vera_b},
                         {"lambda_d", &lambda_d},
                         {"lambda_b", &lambda_b}}) {
    check_same_device(op, name, *t, "x", x);
    check_same_dtype(op, name, *t, "vera_a", vera_a);
  }
  check_row_adapter(op, row_adapter, dims.batch, k_adapters);
  dims.adapters = k_adapters;
  return dims;
}

}  // namespace pypeft
