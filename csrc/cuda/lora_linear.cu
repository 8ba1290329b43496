// pypeft::lora_linear on CUDA: cuBLAS GEMMs (through ATen) for every product,
// one elementwise kernel to apply / regenerate the dropout mask. Same
// semantics and same mask as the CPU kernel (csrc/cpu/lora_linear.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dropout_rows.cuh"
#include "pypeft/lora_linear.h"

namespace pypeft::cuda {
namespace {

constexpr const char* kOp = "pypeft.lora_linear";
constexpr const char* kBackwardOp = "pypeft.lora_linear_backward";

// drop(x2) as a fresh matrix, or x2 itself when dropout is off. row_ids: a
// device pointer naming each row's global row, or null for 0, 1, 2, ...
at::Tensor dropped(const at::Tensor& x2, SeedSource seed, const DropoutParams& d,
                   const int64_t* row_ids = nullptr) {
  if (!d.active) return x2;
  at::Tensor out = at::empty(x2.sizes(), x2.options());
  dropout_rows(x2, out, seed, d, row_ids);
  return out;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const at::Tensor& lora_a,
                                                    const at::Tensor& lora_b, double scale,
                                                    double dropout_p,
                                                    const c10::optional<at::Tensor>& seed,
                                                    const c10::optional<at::Tensor>& weight_absmax,
                                                    int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const auto dims = check_lora_linear_args(kOp, x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                           seed, kLoraArgs, base);
  // The math inside is not itself differentiated (the autograd formula is
  // the backward op), also when called from C++ on tensors requiring grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto drop = DropoutParams::from_probability(dropout_p);
  const at::Tensor x2 = as_rows(x, dims.in);
  const auto ops = lora_adapter_operands(lora_a, lora_b, scale, x.scalar_type());

  // The dropped copy of x is a temporary: only u is kept for backward.
  // The frozen product exactly as nn.Linear computes it (a fresh adapter
  // gives the base output bit for bit; an NF4 weight goes tile by tile of its
  // rows), then the rank-r update onto it.
  at::Tensor y2 = frozen_product(x2, weight, bias, base);
  at::Tensor u2 = at::mm(dropped(x2, seed_source(seed), drop), ops.a.t());
  y2.addmm_(u2, ops.b_scaled.t());
  return {y2.view(with_last_dim(x.sizes(), dims.out)), u2.view(with_last_dim(x.sizes(), dims.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_u, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& u, double scale, double dropout_p, const c10::optional<at::Tensor>& seed,
    std::array<bool, 5> output_mask, const c10::optional<at::Tensor>& row_ids,
    const c10::optional<at::Tensor>& weight_absmax, int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const auto dims = check_lora_linear_backward_args(kBackwardOp, grad_out, grad_u, x, weight,
                                                    lora_a, lora_b, u, scale, dropout_p, seed,
                                                    row_ids, kLoraArgs, base);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [need_x, need_weight, need_bias, need_a, need_b] = output_mask;
  check_no_nf4_weight_grad(kBackwardOp, base, need_weight);
  const auto drop = DropoutParams::from_probability(dropout_p);
  const SeedSource seed_src = seed_source(seed);
  // Rows gathered out of a larger x (token-subset ops) keep the mask they had
  // there; the ids stay on x's device (checked), read by the kernel.
  const at::Tensor ids = drop.active && has_value(row_ids) ? row_ids->contiguous() : at::Tensor();
  const int64_t* id_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  const at::Tensor x2 = as_rows(x, dims.in);
  const at::Tensor gy2 = as_rows(grad_out, dims.out);
  const at::Tensor u2 = as_rows(u, dims.r);
  const auto ops = lora_adapter_operands(lora_a, lora_b, scale, x.scalar_type());

  at::Tensor grad_x, grad_weight, grad_bias, grad_a, grad_b;
  if (need_b) grad_b = at::mm(gy2.t(), u2).mul_(scale).to(lora_b.scalar_type());
  if (need_a || need_x) {
    at::Tensor g = at::mm(gy2, ops.b_scaled);  // dL/du
    if (has_value(grad_u)) g.add_(as_rows(*grad_u, dims.r));
    if (need_a)
      grad_a = at::mm(g.t(), dropped(x2, seed_src, drop, id_ptr)).to(lora_a.scalar_type());
    if (need_x) {
      at::Tensor gx2 = at::mm(g, ops.a);
      if (drop.active) dropout_rows(gx2, gx2, seed_src, drop, id_ptr);
      add_frozen_grad(gx2, gy2, weight, base);
      grad_x = gx2.view(x.sizes());
    }
  }
  if (need_weight) grad_weight = at::mm(gy2.t(), x2);
  if (need_bias) grad_bias = gy2.sum(0);
  return {grad_x, grad_weight, grad_bias, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace pypeft::cuda
