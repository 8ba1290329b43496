// pypeft::token_subset_layer_norm and pypeft::token_subset_rms_norm
// (TokenTune), for every backend at once: composed of ATen ops.
//
// Forward normalises every token with the same ATen calls, in the same order,
// as the plain norm (so float32 values are bitwise equal to it) and returns
// the selected tokens' rows of x. That is all backward needs: a norm works row
// by row, so its gradient at a selected row depends on that row alone, and its
// statistics are recomputed from x_rows (B * k rows) instead of being saved
// for all B * T.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "pypeft/token_subset.h"

namespace pypeft {
namespace {

constexpr const char* kLayerNormOp = "pypeft.token_subset_layer_norm";
constexpr const char* kLayerNormBackwardOp = "pypeft.token_subset_layer_norm_backward";
constexpr const char* kRmsNormOp = "pypeft.token_subset_rms_norm";
constexpr const char* kRmsNormBackwardOp = "pypeft.token_subset_rms_norm_backward";

using Tensor = at::Tensor;
using OptTensor = c10::optional<Tensor>;

// x (or grad_y): [B, T, ..., D], normalised over D.
void check_norm_input(const char* op, const char* arg, const Tensor& x, double eps) {
  check_defined(op, arg, x);
  PYPEFT_CHECK_VALUE(x.dim() >= 3 && x.size(-1) >= 1, op, arg,
                     "a tensor of shape [B, T, ..., D] with D >= 1", "shape " + shape_str(x.sizes()));
  check_activation_dtype(op, arg, x);
  PYPEFT_CHECK_VALUE(std::isfinite(eps), op, "eps", "a finite number", eps);
}

// weight / bias: [D], in x's dtype, or float32 beside a bfloat16/float16 x
// (fp32 master weights in a low-precision model). `x` is what holds x's
// dtype: x in forward, x_rows in backward.
void check_norm_param(const char* op, const char* arg, const OptTensor& param, int64_t features,
                      const char* x_arg, const Tensor& x) {
  if (!has_value(param)) return;
  check_dim(op, arg, *param, 1);
  check_size(op, arg, *param, 0, features, "the normalised last dim");
  check_same_device(op, arg, *param, x_arg, x);
  const auto xt = x.scalar_type();
  const bool low_precision_x = xt == at::kBFloat16 || xt == at::kHalf;
  PYPEFT_CHECK_TYPE(param->scalar_type() == xt || (low_precision_x && param->scalar_type() == at::kFloat),
                    op, arg,
                    std::string("dtype ") + c10::toString(xt) + " (the dtype of '" + x_arg + "')" +
                        (low_precision_x ? " or float32" : ""),
                    c10::toString(param->scalar_type()));
}

// Backward's operands: the selected rows of grad_y and x, each viewed as
// [B * k * (F / D), D], and the flat row indices to scatter grad_x back.
struct NormRows {
  TokenSubsetDims dims;
  Tensor rows;
  Tensor grad;
  Tensor x;
};

NormRows norm_rows(const char* op, const Tensor& grad_y, const Tensor& x_rows, double eps,
                   const Tensor& positions) {
  check_norm_input(op, "grad_y", grad_y, eps);
  const auto dims = check_positions(op, positions, "grad_y", grad_y, 0, 1, /*check_values=*/false);
  check_rows(op, "x_rows", x_rows, dims, "grad_y", grad_y);
  check_activation_dtype(op, "x_rows", x_rows);
  const int64_t d = grad_y.size(-1);
  Tensor rows = flat_rows(positions, dims.tokens);
  Tensor grad = gather_rows(grad_y, rows).view({-1, d});
  return {dims, rows, grad, x_rows.reshape({-1, d})};
}

Tensor scatter_grad_x(const Tensor& grad_rows, const NormRows& r, const Tensor& grad_y) {
  return scatter_rows(grad_rows.reshape({r.dims.batch * r.dims.k, row_features(grad_y)}), r.rows,
                      grad_y.sizes());
}

std::tuple<Tensor, Tensor> token_subset_layer_norm(const Tensor& x, const OptTensor& weight,
                                                   const OptTensor& bias, double eps,
                                                   const Tensor& positions) {
  check_norm_input(kLayerNormOp, "x", x, eps);
  check_norm_param(kLayerNormOp, "weight", weight, x.size(-1), "x", x);
  check_norm_param(kLayerNormOp, "bias", bias, x.size(-1), "x", x);
  if (has_value(weight) && has_value(bias)) check_same_dtype(kLayerNormOp, "bias", *bias, "weight", *weight);
  const auto dims = check_positions(kLayerNormOp, positions, "x", x, 0, 1, /*check_values=*/true);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor y = at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
  return {y, gather_rows(x, flat_rows(positions, dims.tokens))};
}

std::tuple<Tensor, Tensor, Tensor> token_subset_layer_norm_backward(
    const Tensor& grad_y, const Tensor& x_rows, const OptTensor& weight, const OptTensor& bias,
    double eps, const Tensor& positions, std::array<bool, 3> output_mask) {
  const auto r = norm_rows(kLayerNormBackwardOp, grad_y, x_rows, eps, positions);
  check_same_dtype(kLayerNormBackwardOp, "grad_y", grad_y, "x_rows", x_rows);
  const int64_t d = grad_y.size(-1);
  check_norm_param(kLayerNormBackwardOp, "weight", weight, d, "x_rows", x_rows);
  check_norm_param(kLayerNormBackwardOp, "bias", bias, d, "x_rows", x_rows);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // Only mean and rstd are wanted; native_layer_norm is the one ATen call that
  // gives them exactly as forward computed them.
  const auto stats = at::native_layer_norm(r.x, {d}, weight, bias, eps);
  const Tensor& mean = std::get<1>(stats);
  const Tensor& rstd = std::get<2>(stats);
  const std::array<bool, 3> mask{output_mask[0], output_mask[1] && has_value(weight),
                                 output_mask[2] && has_value(bias)};
  const auto [grad_rows, grad_weight, grad_bias] =
      at::native_layer_norm_backward(r.grad, r.x, {d}, mean, rstd, weight, bias, mask);
  Tensor grad_x = mask[0] ? scatter_grad_x(grad_rows, r, grad_y) : Tensor();
  return {grad_x, grad_weight, grad_bias};
}

// transformers' RMSNorm computes in float32 whatever x's dtype; float64 stays
// float64 here (transformers would round it through float32), so that float64
// checks of the gradient hold to float64 precision.
at::ScalarType rms_compute_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor> token_subset_rms_norm(const Tensor& x, const OptTensor& weight, double eps,
                                                 const Tensor& positions) {
  check_norm_input(kRmsNormOp, "x", x, eps);
  check_norm_param(kRmsNormOp, "weight", weight, x.size(-1), "x", x);
  const auto dims = check_positions(kRmsNormOp, positions, "x", x, 0, 1, /*check_values=*/true);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // LlamaRMSNorm.forward, op for op.
  Tensor h = x.to(rms_compute_type(x));
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  Tensor y = h.to(x.scalar_type());
  if (has_value(weight)) y = *weight * y;
  // Contiguous whatever x's strides, as the fake kernel says (and layer_norm gives).
  return {y.contiguous(), gather_rows(x, flat_rows(positions, dims.tokens))};
}

// With h = x·r, r = (mean(x²) + eps)^(-1/2) and y = w ⊙ cast(h):
//   grad_h = g ⊙ w,  grad_x = r · (grad_h − h · mean(grad_h ⊙ h)),  grad_w = Σ_rows g ⊙ cast(h),
// in the compute dtype (the cast's gradient is the identity).
std::tuple<Tensor, Tensor> token_subset_rms_norm_backward(const Tensor& grad_y, const Tensor& x_rows,
                                                          const OptTensor& weight, double eps,
                                                          const Tensor& positions,
                                                          std::array<bool, 2> output_mask) {
  const auto r = norm_rows(kRmsNormBackwardOp, grad_y, x_rows, eps, positions);
  check_norm_param(kRmsNormBackwardOp, "weight", weight, grad_y.size(-1), "x_rows", x_rows);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto ct = rms_compute_type(x_rows);
  const Tensor x = r.x.to(ct);
  const Tensor g = r.grad.to(ct);
  const Tensor rstd = at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps);
  const Tensor h = x * rstd;
  Tensor grad_x, grad_weight;
  if (output_mask[0]) {
    const Tensor grad_h = has_value(weight) ? g * weight->to(ct) : g;
    const Tensor grad_rows = rstd * (grad_h - h * (grad_h * h).mean(-1, /*keepdim=*/true));
    grad_x = scatter_grad_x(grad_rows.to(x_rows.scalar_type()), r, grad_y);
  }
  if (output_mask[1] && has_value(weight)) {
    // Forward multiplied w by h rounded to x's dtype: so does its gradient.
    const Tensor h_cast = h.to(x_rows.scalar_type()).to(ct);
    grad_weight = (g * h_cast).sum(0).to(weight->scalar_type());
  }
  return {grad_x, grad_weight};
}

}  // namespace

// Backend-generic: ATen's own kernels do the work on CPU and CUDA.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("token_subset_layer_norm", &token_subset_layer_norm);
  m.impl("token_subset_layer_norm_backward", &token_subset_layer_norm_backward);
  m.impl("token_subset_rms_norm", &token_subset_rms_norm);
  m.impl("token_subset_rms_norm_backward", &token_subset_rms_norm_backward);
}

}  // namespace pypeft
