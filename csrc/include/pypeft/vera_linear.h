// pypeft::vera_linear — argument validation (shared by every backend).
//
//   y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ),   u = drop(x) A_sᵀ
//
// A [r, max_in] and B [max_out, r] are frozen and shared by every adapted
// layer; a layer uses A_s = A[:, :in] and B_s = B[:out, :]. dtypes: A, B,
// λ_d, λ_b share one dtype, x's or float32 when x is bfloat16/float16 (as for
// lora_linear). The frozen weight may be NF4, as lora_linear's (BaseWeight).
#pragma once

#include "pypeft/lora_linear.h"

namespace pypeft {

// The shared matrices against the layer (weight [out, in], or NF4 codes
// [out, in / 2]) and the vectors: shapes, devices and dtypes.
inline void check_vera_shared_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& vera_a, const at::Tensor& vera_b,
                                   const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                                   const BaseWeight& base = {}) {
  check_dim(op, "vera_a", vera_a, 2);
  check_dim(op, "vera_b", vera_b, 2);
  check_dim(op, "weight", weight, 2);
  check_weight_form(op, weight, base);
  const int64_t in = weight_in_features(weight, base), out = weight.size(0), r = vera_a.size(0);
  PYPEFT_CHECK_VALUE(vera_a.size(1) >= in, op, "vera_a",
                     "shape [r, max_in] with max_in >= in_features " + std::to_string(in) +
                         " (the shared matrix is sliced per layer)",
                     "shape " + shape_str(vera_a.sizes()));
  PYPEFT_CHECK_VALUE(vera_b.size(0) >= out, op, "vera_b",
                     "shape [max_out, r] with max_out >= out_features " + std::to_string(out) +
                         " (the shared matrix is sliced per layer)",
                     "shape " + shape_str(vera_b.sizes()));
  check_size(op, "vera_b", vera_b, 1, r, "rank r, from vera_a [r, max_in]");
  check_dim(op, "lambda_d", lambda_d, 1);
  check_size(op, "lambda_d", lambda_d, 0, r, "rank r, from vera_a [r, max_in]");
  check_dim(op, "lambda_b", lambda_b, 1);
  check_size(op, "lambda_b", lambda_b, 0, out, "out_features, from weight [out, in]");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"lambda_d", &lambda_d},
                         {"lambda_b", &lambda_b}}) {
    check_same_device(op, name, *t, "x", x);
    check_same_dtype(op, name, *t, "vera_a", vera_a);
  }
}

inline LoraLinearDims check_vera_linear_args(const char* op, const at::Tensor& x,
                                             const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias,
                                             const at::Tensor& vera_a, const at::Tensor& vera_b,
                                             const at::Tensor& lambda_d,
                                             const at::Tensor& lambda_b, double dropout_p,
                                             const c10::optional<at::Tensor>& seed,
                                             const BaseWeight& base = {}) {
  check_vera_shared_args(op, x, weight, vera_a, vera_b, lambda_d, lambda_b, base);
  // The slices are what the LoRA-shaped checks see; messages name the shared matrices.
  return check_lora_linear_args(op, x, weight, bias,
                                vera_a.narrow(1, 0, weight_in_features(weight, base)),
                                vera_b.narrow(0, 0, weight.size(0)), 1.0, dropout_p, seed,
                                kVeraArgs, base);
}

inline LoraLinearDims check_vera_linear_backward_args(
    const char* op, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_u,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& vera_a,
    const at::Tensor& vera_b, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
    const at::Tensor& u, double dropout_p, const c10::optional<at::Tensor>& seed,
    const c10::optional<at::Tensor>& row_ids, const BaseWeight& base = {}) {
  check_vera_shared_args(op, x, weight, vera_a, vera_b, lambda_d, lambda_b, base);
  return check_lora_linear_backward_args(op, grad_out, grad_u, x, weight,
                                         vera_a.narrow(1, 0, weight_in_features(weight, base)),
                                         vera_b.narrow(0, 0, weight.size(0)), u, 1.0, dropout_p,
                                         seed, row_ids, kVeraArgs, base);
}

}  // namespace pypeft
