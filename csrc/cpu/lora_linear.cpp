// pypeft::lora_linear on the CPU.
//
// The frozen product x Wᵀ (and grad_out W in backward) runs as one full-size
// MKL GEMM on all threads (for an NF4 weight, one per tile of W's rows:
// pypeft/nf4_linear.h). Everything rank-r runs block by block of rows (see
// row_blocks.h): the dropped copy of x exists only one cache-sized block at a
// time, the mask is regenerated from the seed, and x and grad_out are read
// from memory once for all the small products.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "dropout_rows.h"
#include "pypeft/lora_linear.h"
#include "row_blocks.h"

namespace pypeft::cpu {
namespace {

constexpr const char* kOp = "pypeft.lora_linear";
constexpr const char* kBackwardOp = "pypeft.lora_linear_backward";

uint64_t seed_value(const c10::optional<at::Tensor>& seed) {
  if (!has_value(seed)) return 0;
  return static_cast<uint64_t>(seed->item<int64_t>());
}

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf ? at::kFloat : t;
}

// acc += lhs @ rhs, where acc may be a wider dtype than lhs and rhs.
void add_product(at::Tensor& acc, const at::Tensor& lhs, const at::Tensor& rhs) {
  if (acc.scalar_type() == lhs.scalar_type())
    acc.addmm_(lhs, rhs);
  else
    acc.add_(at::mm(lhs, rhs));
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
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
  const auto drop = DropoutParams::from_probability(dropout_p);
  const uint64_t seed_v = seed_value(seed);
  const at::Tensor x2 = as_rows(x, dims.in);
  const auto ops = lora_adapter_operands(lora_a, lora_b, scale, x.scalar_type());
  const at::Tensor a_t = ops.a.t();
  const at::Tensor b_t = ops.b_scaled.t();

  // The frozen product first, computed exactly as nn.Linear computes it, so
  // that a fresh adapter (B = 0) gives the base layer's output bit for bit.
  at::Tensor y2 = frozen_product(x2, weight, bias, base);
  // Then the rank-r update, block by block: u's block is still in cache when
  // it is multiplied out, and the dropped copy of x never exceeds one block.
  at::Tensor u2 = at::empty({dims.rows, dims.r}, x.options());
  const int64_t block = rows_per_block(dims.in, x.element_size());
  const at::Tensor scratch = drop.active
      ? at::empty({num_row_chunks(dims.rows, block), block, dims.in}, x.options())
      : at::Tensor();
  for_each_row_block(dims.rows, block, [&](int64_t c, int64_t b, int64_t e) {
    at::Tensor xb = x2.slice(0, b, e);
    if (drop.active) {
      at::Tensor dropped = scratch[c].slice(0, 0, e - b);
      dropout_rows(xb, dropped, b, seed_v, drop);
      xb = dropped;
    }
    at::Tensor ub = u2.slice(0, b, e);
    at::mm_out(ub, xb, a_t);
    y2.slice(0, b, e).addmm_(ub, b_t);
  });
  return {y2.view(with_last_dim(x.sizes(), dims.out)), u2.view(with_last_dim(x.sizes(), dims.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
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
  const auto [need_x, need_weight, need_bias, need_a, need_b] = output_mask;
  check_no_nf4_weight_grad(kBackwardOp, base, need_weight);
  const auto drop = DropoutParams::from_probability(dropout_p);
  const uint64_t seed_v = seed_value(seed);
  // Rows gathered out of a larger x (token-subset ops) keep the mask they had
  // there: row i regenerates the mask of global row row_ids[i].
  const at::Tensor ids = drop.active && has_value(row_ids) ? row_ids->contiguous() : at::Tensor();
  const int64_t* id_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  const at::Tensor x2 = as_rows(x, dims.in);
  const at::Tensor gy2 = as_rows(grad_out, dims.out);
  const at::Tensor u2 = as_rows(u, dims.r);
  const bool has_grad_u = has_value(grad_u);
  const at::Tensor gu_in = has_grad_u ? as_rows(*grad_u, dims.r) : at::Tensor();
  const auto ops = lora_adapter_operands(lora_a, lora_b, scale, x.scalar_type());

  const int64_t block = rows_per_block(std::max(dims.in, dims.out), x.element_size());
  const int64_t chunks = num_row_chunks(dims.rows, block);
  const auto acc_opts = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor grad_x2 = need_x ? at::empty({dims.rows, dims.in}, x.options()) : at::Tensor();
  at::Tensor grad_a_parts = need_a ? at::zeros({chunks, dims.r, dims.in}, acc_opts) : at::Tensor();
  at::Tensor grad_b_parts = need_b ? at::zeros({chunks, dims.out, dims.r}, acc_opts) : at::Tensor();

  for_each_row_block(dims.rows, block, [&](int64_t c, int64_t b, int64_t e) {
    const at::Tensor gyb = gy2.slice(0, b, e);
    if (need_b) {
      at::Tensor acc = grad_b_parts[c];
      add_product(acc, gyb.t(), u2.slice(0, b, e));  // grad_B / scale, [out, r]
    }
    if (!need_a && !need_x) return;
    // g = dL/du for this block: scale · grad_out B, plus what flowed into u.
    at::Tensor g = at::mm(gyb, ops.b_scaled);
    if (has_grad_u) g.add_(gu_in.slice(0, b, e));
    if (need_a) {
      at::Tensor xb = x2.slice(0, b, e);
      if (drop.active) {
        at::Tensor dropped = at::empty_like(xb, at::MemoryFormat::Contiguous);
        dropout_rows(xb, dropped, b, seed_v, drop, id_ptr);
        xb = dropped;
      }
      at::Tensor acc = grad_a_parts[c];
      add_product(acc, g.t(), xb);
    }
    if (need_x) {
      at::Tensor gxb = grad_x2.slice(0, b, e);
      at::mm_out(gxb, g, ops.a);
      if (drop.active) dropout_rows(gxb, gxb, b, seed_v, drop, id_ptr);
    }
  });

  at::Tensor grad_x, grad_weight, grad_bias, grad_a, grad_b;
  if (need_x) {
    add_frozen_grad(grad_x2, gy2, weight, base);  // the frozen path, onto the adapter's part
    grad_x = grad_x2.view(x.sizes());
  }
  if (need_weight) grad_weight = at::mm(gy2.t(), x2);
  if (need_bias) grad_bias = gy2.sum(0);
  if (need_a) grad_a = grad_a_parts.sum(0).to(lora_a.scalar_type());
  if (need_b) grad_b = grad_b_parts.sum(0).mul_(scale).to(lora_b.scalar_type());
  return {grad_x, grad_weight, grad_bias, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace pypeft::cpu
