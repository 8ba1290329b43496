// pypeft::vera_linear, for every backend at once.
//
// VeRA is LoRA with B_eff = diag(λ_b) B_s diag(λ_d) (out × r, tiny) and scale
// 1, so it runs on lora_linear's kernels (CPU and CUDA): forward computes
// B_eff and calls pypeft::lora_linear; backward asks lora_linear_backward for
// grad_x and grad_B_eff only (A and B are frozen) and reduces grad_B_eff to the
// two vectors' gradients. Saved for backward: x and u (N × r), as for LoRA;
// nothing of size N × out is formed beyond y itself. An NF4 base weight passes
// through to lora_linear's kernels (weight_absmax, weight_blocksize).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "pypeft/op_handles.h"
#include "pypeft/vera_linear.h"

namespace pypeft {
namespace {

constexpr const char* kOp = "pypeft.vera_linear";
constexpr const char* kBackwardOp = "pypeft.vera_linear_backward";

using Tensor = at::Tensor;
using OptTensor = c10::optional<Tensor>;

struct VeraOperands {
  Tensor a_s;    // [r, in], a view of the shared A
  Tensor b_s;    // [out, r], a view of the shared B
  Tensor b_eff;  // diag(λ_b) B_s diag(λ_d)
};

VeraOperands vera_operands(const Tensor& weight, const BaseWeight& base, const Tensor& vera_a,
                           const Tensor& vera_b, const Tensor& lambda_d, const Tensor& lambda_b) {
  const int64_t in = weight_in_features(weight, base), out = weight.size(0);
  Tensor a_s = vera_a.narrow(1, 0, in);
  Tensor b_s = vera_b.narrow(0, 0, out);
  return {a_s, b_s, b_s * lambda_b.unsqueeze(1) * lambda_d.unsqueeze(0)};
}

std::tuple<Tensor, Tensor> vera_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                       const Tensor& vera_a, const Tensor& vera_b,
                                       const Tensor& lambda_d, const Tensor& lambda_b,
                                       double dropout_p, const OptTensor& seed,
                                       const OptTensor& weight_absmax, int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  check_vera_linear_args(kOp, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed,
                         base);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto v = vera_operands(weight, base, vera_a, vera_b, lambda_d, lambda_b);
  return ops::lora_linear().call(x, weight, bias, v.a_s, v.b_eff, 1.0, dropout_p, seed,
                                 weight_absmax, weight_blocksize);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> vera_linear_backward(
    const Tensor& grad_out, const OptTensor& grad_u, const Tensor& x, const Tensor& weight,
    const Tensor& vera_a, const Tensor& vera_b, const Tensor& lambda_d, const Tensor& lambda_b,
    const Tensor& u, double dropout_p, const OptTensor& seed, std::array<bool, 5> output_mask,
    const OptTensor& row_ids, const OptTensor& weight_absmax, int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  // Checked here so that errors name this op and its arguments, not lora_linear_backward's.
  check_vera_linear_backward_args(kBackwardOp, grad_out, grad_u, x, weight, vera_a, vera_b,
                                  lambda_d, lambda_b, u, dropout_p, seed, row_ids, base);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [need_x, need_weight, need_bias, need_ld, need_lb] = output_mask;
  check_no_nf4_weight_grad(kBackwardOp, base, need_weight);
  const auto v = vera_operands(weight, base, vera_a, vera_b, lambda_d, lambda_b);
  const bool need_b_eff = need_ld || need_lb;
  const std::array<bool, 5> lora_mask{need_x, need_weight, need_bias, false, need_b_eff};
  auto [grad_x, grad_weight, grad_bias, unused_a, grad_b_eff] = ops::lora_linear_backward().call(
      grad_out, grad_u, x, weight, v.a_s, v.b_eff, u, 1.0, dropout_p, seed, lora_mask, row_ids,
      weight_absmax, weight_blocksize);
  Tensor grad_ld, grad_lb;
  if (need_ld) grad_ld = (grad_b_eff * v.b_s * lambda_b.unsqueeze(1)).sum(0);
  if (need_lb) grad_lb = (grad_b_eff * v.b_s * lambda_d.unsqueeze(0)).sum(1);
  return {grad_x, grad_weight, grad_bias, grad_ld, grad_lb};
}

}  // namespace

// Backend-generic: the work happens in lora_linear's CPU and CUDA kernels.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("vera_linear", &vera_linear);
  m.impl("vera_linear_backward", &vera_linear_backward);
}

}  // namespace pypeft
