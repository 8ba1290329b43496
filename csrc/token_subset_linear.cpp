// pypeft::token_subset_linear, token_subset_lora_linear, token_subset_vera_linear
// and their backward ops (TokenTune), for every backend at once.
//
// Forward is the plain op on every token (at::linear, pypeft::lora_linear,
// pypeft::vera_linear), so y equals the unpatched layer's bit for bit; then
// only the selected tokens' rows are gathered for backward: x_rows [B·k, in]
// and, for adapters, u_rows [B·k, r] (the full u is dropped at once).
// Backward runs the plain op's backward on the k selected rows of grad_y
// (lora_linear_backward's kernels, told the rows' flat ids so that they
// regenerate forward's dropout mask) and scatters grad_x into zeros: the
// unselected tokens get no gradient and parameter gradients sum over the
// selected tokens only. Nothing of size B·T is saved or recomputed. An NF4
// base weight (weight_absmax given) goes to lora_linear's kernels as it came,
// or (token_subset_linear) through the tiled NF4 products of nf4_linear.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "pypeft/op_handles.h"
#include "pypeft/token_subset.h"
#include "pypeft/vera_linear.h"

namespace pypeft {
namespace {

constexpr const char* kLinearOp = "pypeft.token_subset_linear";
constexpr const char* kLinearBackwardOp = "pypeft.token_subset_linear_backward";
constexpr const char* kLoraOp = "pypeft.token_subset_lora_linear";
constexpr const char* kLoraBackwardOp = "pypeft.token_subset_lora_linear_backward";
constexpr const char* kVeraOp = "pypeft.token_subset_vera_linear";
constexpr const char* kVeraBackwardOp = "pypeft.token_subset_vera_linear_backward";

using Tensor = at::Tensor;
using OptTensor = c10::optional<Tensor>;
using Grads3 = std::tuple<Tensor, Tensor, Tensor>;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// t is [batch, tokens, features]: positions index dim 1, and grad_x is
// rebuilt in that shape.
void check_tokens_layout(const char* op, const char* arg, const Tensor& t, const char* features) {
  check_defined(op, arg, t);
  PYPEFT_CHECK_VALUE(t.dim() == 3, op, arg,
                     std::string("a 3-D tensor [batch, tokens, ") + features + "]",
                     std::to_string(t.dim()) + "-D tensor of shape " + shape_str(t.sizes()));
}

// Forward: x [B, T, in] and the positions of its selected tokens, whose
// values are read (every position in [0, T), distinct within its row).
TokenSubsetDims check_selection(const char* op, const Tensor& x, const Tensor& positions) {
  check_tokens_layout(op, "x", x, "in_features");
  return check_positions(op, positions, "x", x, 0, 1, /*check_values=*/true);
}

// What every backward here starts from: grad_y [B, T, out] against weight
// and positions (forward checked the values), the flat rows b·T + t of the
// selected tokens, and grad_y's rows there.
struct SelectedGrad {
  TokenSubsetDims dims;
  Tensor rows;         // [B·k]
  Tensor grad_y_rows;  // [B·k, out]
};

SelectedGrad selected_grad(const char* op, const Tensor& grad_y, const Tensor& weight,
                           const Tensor& positions, const BaseWeight& base) {
  check_tokens_layout(op, "grad_y", grad_y, "out_features");
  check_activation_dtype(op, "grad_y", grad_y);
  check_dim(op, "weight", weight, 2);
  check_size(op, "grad_y", grad_y, 2, weight.size(0), "out_features, from weight [out, in]");
  check_same_device(op, "weight", weight, "grad_y", grad_y);
  // NF4: codes here; they and the absmax are checked against x_rows later.
  if (base.nf4())
    check_weight_form(op, weight, base);
  else
    check_dense_weight_dtype(op, weight, grad_y, "grad_y");
  const auto dims = check_positions(op, positions, "grad_y", grad_y, 0, 1, /*check_values=*/false);
  Tensor rows = flat_rows(positions, dims.tokens);
  Tensor grad_y_rows = gather_rows(grad_y, rows);
  return {dims, std::move(rows), std::move(grad_y_rows)};
}

// A saved [B·k, cols] tensor of rows, in grad_y's dtype and on its device.
void check_rows(const char* op, const char* arg, const Tensor& t, int64_t rows, int64_t cols,
                const Tensor& grad_y) {
  check_defined(op, arg, t);
  const std::vector<int64_t> expected{rows, cols};
  PYPEFT_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), op, arg,
                     "shape " + shape_str(expected) + " (one row per selected token)",
                     "shape " + shape_str(t.sizes()));
  check_same_device(op, arg, t, "grad_y", grad_y);
  check_same_dtype(op, arg, t, "grad_y", grad_y);
}

// x_rows as the backward kernels take it. Autograd saves x_rows only when a
// gradient reads its values (grad_weight; LoRA's grad_lora_a too) and passes
// an empty [0] tensor otherwise. A stand-in with x_rows' shape, dtype and
// device but one row of storage then takes its place: the kernels read only
// its metadata (its unit stride in the last dim keeps them from copying it).
Tensor x_rows_operand(const char* op, const Tensor& x_rows, int64_t rows, int64_t in,
                      const Tensor& grad_y, bool values_needed) {
  check_defined(op, "x_rows", x_rows);
  if (!values_needed && x_rows.dim() == 1 && x_rows.numel() == 0) {
    check_same_device(op, "x_rows", x_rows, "grad_y", grad_y);
    return at::empty({in}, grad_y.options()).expand({rows, in});
  }
  check_rows(op, "x_rows", x_rows, rows, in, grad_y);
  return x_rows;
}

Tensor scatter_grad_x(const Tensor& grad_x_rows, const SelectedGrad& g) {
  if (!grad_x_rows.defined()) return grad_x_rows;
  return scatter_rows(grad_x_rows, g.rows,
                      {g.dims.batch, g.dims.tokens, grad_x_rows.size(1)});
}

// --- without an adapter ------------------------------------------------------

std::tuple<Tensor, Tensor> token_subset_linear(const Tensor& x, const Tensor& weight,
                                               const OptTensor& bias, const Tensor& positions,
                                               const OptTensor& weight_absmax,
                                               int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const int64_t in = check_linear_args(kLinearOp, x, weight, bias, base);
  const auto dims = check_selection(kLinearOp, x, positions);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // at::linear is what torch.nn.functional.linear runs: the same values (an
  // NF4 weight: tile by tile of its rows).
  Tensor y = base.nf4() ? frozen_product(x.reshape({-1, in}), weight, bias, base)
                              .view(with_last_dim(x.sizes(), weight.size(0)))
                        : at::linear(x, weight, bias);
  return {std::move(y), gather_rows(x, flat_rows(positions, dims.tokens))};
}

Grads3 token_subset_linear_backward(const Tensor& grad_y, const Tensor& x_rows,
                                    const Tensor& weight, const Tensor& positions,
                                    std::array<bool, 3> output_mask,
                                    const OptTensor& weight_absmax, int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const auto [need_x, need_weight, need_bias] = output_mask;
  const auto g = selected_grad(kLinearBackwardOp, grad_y, weight, positions, base);
  const int64_t in = weight_in_features(weight, base);
  const Tensor xr =
      x_rows_operand(kLinearBackwardOp, x_rows, g.rows.size(0), in, grad_y, need_weight);
  if (base.nf4()) check_nf4_weight(kLinearBackwardOp, kNf4BaseArgs, weight, *weight_absmax,
                                   weight_blocksize, xr, "x_rows");
  check_no_nf4_weight_grad(kLinearBackwardOp, base, need_weight);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor grad_x, grad_weight, grad_bias;
  if (need_x) {
    Tensor gx;
    if (base.nf4()) {
      gx = at::empty({g.grad_y_rows.size(0), in}, grad_y.options());
      nf4_matmul_w(gx, g.grad_y_rows, nf4_operand(weight, base), /*accumulate=*/false);
    } else {
      gx = at::mm(g.grad_y_rows, weight);
    }
    grad_x = scatter_grad_x(gx, g);
  }
  if (need_weight) grad_weight = at::mm(g.grad_y_rows.t(), xr);
  if (need_bias) grad_bias = g.grad_y_rows.sum(0);
  return {grad_x, grad_weight, grad_bias};
}

// --- LoRA -------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> token_subset_lora_linear(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a,
    const Tensor& lora_b, double scale, double dropout_p, const OptTensor& seed,
    const Tensor& positions, const OptTensor& weight_absmax, int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  check_lora_linear_args(kLoraOp, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
                         kLoraArgs, base);
  const auto dims = check_selection(kLoraOp, x, positions);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // lora_linear keys the mask by x's flat row b·T + t, as backward does.
  auto [y, u] = ops::lora_linear().call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
                                        weight_absmax, weight_blocksize);
  const Tensor rows = flat_rows(positions, dims.tokens);
  return {std::move(y), gather_rows(x, rows), gather_rows(u, rows)};
}

Grads5 token_subset_lora_linear_backward(const Tensor& grad_y, const Tensor& x_rows,
                                         const Tensor& weight, const Tensor& lora_a,
                                         const Tensor& lora_b, const Tensor& u_rows, double scale,
                                         double dropout_p, const OptTensor& seed,
                                         const Tensor& positions,
                                         std::array<bool, 5> output_mask,
                                         const OptTensor& weight_absmax,
                                         int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const auto [need_x, need_weight, need_bias, need_a, need_b] = output_mask;
  const auto g = selected_grad(kLoraBackwardOp, grad_y, weight, positions, base);
  const int64_t n = g.rows.size(0);
  const Tensor xr = x_rows_operand(kLoraBackwardOp, x_rows, n, weight_in_features(weight, base),
                                   grad_y, need_weight || need_a);
  // The adapter's arguments, named under this op (the kernel checks again).
  check_lora_linear_args(kLoraBackwardOp, xr, weight, c10::nullopt, lora_a, lora_b, scale,
                         dropout_p, seed, kLoraArgs, base);
  check_rows(kLoraBackwardOp, "u_rows", u_rows, n, lora_a.size(0), grad_y);
  check_no_nf4_weight_grad(kLoraBackwardOp, base, need_weight);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [grad_x, grad_weight, grad_bias, grad_a, grad_b] = ops::lora_linear_backward().call(
      g.grad_y_rows, c10::nullopt, xr, weight, lora_a, lora_b, u_rows, scale, dropout_p, seed,
      output_mask, g.rows, weight_absmax, weight_blocksize);
  return {scatter_grad_x(grad_x, g), grad_weight, grad_bias, grad_a, grad_b};
}

// --- VeRA -------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> token_subset_vera_linear(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& vera_a,
    const Tensor& vera_b, const Tensor& lambda_d, const Tensor& lambda_b, double dropout_p,
    const OptTensor& seed, const Tensor& positions, const OptTensor& weight_absmax,
    int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  check_vera_linear_args(kVeraOp, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p,
                         seed, base);
  const auto dims = check_selection(kVeraOp, x, positions);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [y, u] = ops::vera_linear().call(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b,
                                        dropout_p, seed, weight_absmax, weight_blocksize);
  const Tensor rows = flat_rows(positions, dims.tokens);
  return {std::move(y), gather_rows(x, rows), gather_rows(u, rows)};
}

// x_rows' values only feed grad_weight: the vectors' gradients come from u_rows.
Grads5 token_subset_vera_linear_backward(const Tensor& grad_y, const Tensor& x_rows,
                                         const Tensor& weight, const Tensor& vera_a,
                                         const Tensor& vera_b, const Tensor& lambda_d,
                                         const Tensor& lambda_b, const Tensor& u_rows,
                                         double dropout_p, const OptTensor& seed,
                                         const Tensor& positions,
                                         std::array<bool, 5> output_mask,
                                         const OptTensor& weight_absmax,
                                         int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const bool need_weight = output_mask[1];
  const auto g = selected_grad(kVeraBackwardOp, grad_y, weight, positions, base);
  const int64_t n = g.rows.size(0);
  const Tensor xr = x_rows_operand(kVeraBackwardOp, x_rows, n, weight_in_features(weight, base),
                                   grad_y, need_weight);
  check_vera_linear_args(kVeraBackwardOp, xr, weight, c10::nullopt, vera_a, vera_b, lambda_d,
                         lambda_b, dropout_p, seed, base);
  check_rows(kVeraBackwardOp, "u_rows", u_rows, n, vera_a.size(0), grad_y);
  check_no_nf4_weight_grad(kVeraBackwardOp, base, need_weight);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [grad_x, grad_weight, grad_bias, grad_ld, grad_lb] = ops::vera_linear_backward().call(
      g.grad_y_rows, c10::nullopt, xr, weight, vera_a, vera_b, lambda_d, lambda_b, u_rows,
      dropout_p, seed, output_mask, g.rows, weight_absmax, weight_blocksize);
  return {scatter_grad_x(grad_x, g), grad_weight, grad_bias, grad_ld, grad_lb};
}

}  // namespace

// Backend-generic: the work happens in at::linear's and lora_linear's kernels.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("token_subset_linear", &token_subset_linear);
  m.impl("token_subset_linear_backward", &token_subset_linear_backward);
  m.impl("token_subset_lora_linear", &token_subset_lora_linear);
  m.impl("token_subset_lora_linear_backward", &token_subset_lora_linear_backward);
  m.impl("token_subset_vera_linear", &token_subset_vera_linear);
  m.impl("token_subset_vera_linear_backward", &token_subset_vera_linear_backward);
}

}  // namespace pypeft
