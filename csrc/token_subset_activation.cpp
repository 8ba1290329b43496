// pypeft::token_subset_activation and pypeft::token_subset_gated_activation
// (TokenTune), for every backend at once: composed of ATen ops.
//
// Forward applies the activation to every token with the ATen op the plain
// module uses (bitwise equal values) and returns the selected tokens' input
// rows; backward runs ATen's own derivative kernels (gelu_backward,
// silu_backward, threshold_backward) on those rows only and scatters them
// into a zero grad_x, so nothing of B * T rows is saved.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "pypeft/token_subset.h"

namespace pypeft {
namespace {

constexpr const char* kOp = "pypeft.token_subset_activation";
constexpr const char* kBackwardOp = "pypeft.token_subset_activation_backward";
constexpr const char* kGatedOp = "pypeft.token_subset_gated_activation";
constexpr const char* kGatedBackwardOp = "pypeft.token_subset_gated_activation_backward";

using Tensor = at::Tensor;

enum class Activation { kGelu, kGeluTanh, kSilu, kRelu };

// Parsed in every op (not cached): the string is what the schema carries, and
// a bad one must fail before any work.
Activation parse_kind(const char* op, c10::string_view kind) {
  if (kind == "gelu") return Activation::kGelu;
  if (kind == "gelu_tanh") return Activation::kGeluTanh;
  if (kind == "silu") return Activation::kSilu;
  if (kind == "relu") return Activation::kRelu;
  PYPEFT_CHECK_VALUE(false, op, "kind", "one of 'gelu', 'gelu_tanh', 'silu', 'relu'",
                     "'" + std::string(kind) + "'");
  return Activation::kGelu;  // unreachable
}

Tensor activate(const Tensor& x, Activation kind) {
  switch (kind) {
    case Activation::kGelu: return at::gelu(x);
    case Activation::kGeluTanh: return at::gelu(x, "tanh");
    case Activation::kSilu: return at::silu(x);
    case Activation::kRelu: return at::relu(x);
  }
  return Tensor();  // unreachable
}

// d act(x) / dx applied to grad, exactly as autograd's formulas for the ATen ops.
Tensor activate_backward(const Tensor& grad, const Tensor& x, Activation kind) {
  switch (kind) {
    case Activation::kGelu: return at::gelu_backward(grad, x);
    case Activation::kGeluTanh: return at::gelu_backward(grad, x, "tanh");
    case Activation::kSilu: return at::silu_backward(grad, x);
    // Autograd tests relu's output > 0; x > 0 is the same test.
    case Activation::kRelu: return at::threshold_backward(grad, x, 0);
  }
  return Tensor();  // unreachable
}

std::tuple<Tensor, Tensor> token_subset_activation(const Tensor& x, c10::string_view kind,
                                                   const Tensor& positions) {
  const Activation act = parse_kind(kOp, kind);
  const auto dims = check_positions(kOp, positions, "x", x, 0, 1, /*check_values=*/true);
  check_activation_dtype(kOp, "x", x);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // Contiguous whatever x's strides (the elementwise op would follow them):
  // what the fake kernel promises, so that a compiled graph plans for it.
  return {activate(x, act).contiguous(), gather_rows(x, flat_rows(positions, dims.tokens))};
}

Tensor token_subset_activation_backward(const Tensor& grad_y, const Tensor& x_rows,
                                        c10::string_view kind, const Tensor& positions) {
  const Activation act = parse_kind(kBackwardOp, kind);
  const auto dims = check_positions(kBackwardOp, positions, "grad_y", grad_y, 0, 1, /*check_values=*/false);
  check_activation_dtype(kBackwardOp, "grad_y", grad_y);
  check_rows(kBackwardOp, "x_rows", x_rows, dims, "grad_y", grad_y);
  check_same_dtype(kBackwardOp, "x_rows", x_rows, "grad_y", grad_y);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor rows = flat_rows(positions, dims.tokens);
  return scatter_rows(activate_backward(gather_rows(grad_y, rows), x_rows, act), rows, grad_y.sizes());
}

// gate and up: the same shape, dtype and device ([B, T, ...], Llama's MLP).
TokenSubsetDims check_gated_args(const char* op, const char* gate_arg, const Tensor& gate,
                                 const char* up_arg, const Tensor& up, const Tensor& positions,
                                 bool check_values) {
  const auto dims = check_positions(op, positions, gate_arg, gate, 0, 1, check_values);
  check_activation_dtype(op, gate_arg, gate);
  check_defined(op, up_arg, up);
  PYPEFT_CHECK_VALUE(up.sizes() == gate.sizes(), op, up_arg,
                     "shape " + shape_str(gate.sizes()) + " (the shape of '" + gate_arg + "')",
                     "shape " + shape_str(up.sizes()));
  check_same_dtype(op, up_arg, up, gate_arg, gate);
  check_same_device(op, up_arg, up, gate_arg, gate);
  return dims;
}

std::tuple<Tensor, Tensor, Tensor> token_subset_gated_activation(const Tensor& gate, const Tensor& up,
                                                                 c10::string_view kind,
                                                                 const Tensor& positions) {
  const Activation act = parse_kind(kGatedOp, kind);
  const auto dims = check_gated_args(kGatedOp, "gate", gate, "up", up, positions, /*check_values=*/true);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor rows = flat_rows(positions, dims.tokens);
  return {(activate(gate, act) * up).contiguous(), gather_rows(gate, rows), gather_rows(up, rows)};
}

// y = act(gate) ⊙ up: grad_gate = act'(gate) applied to g ⊙ up, grad_up = g ⊙ act(gate).
std::tuple<Tensor, Tensor> token_subset_gated_activation_backward(
    const Tensor& grad_y, const Tensor& gate_rows, const Tensor& up_rows, c10::string_view kind,
    const Tensor& positions, std::array<bool, 2> output_mask) {
  const Activation act = parse_kind(kGatedBackwardOp, kind);
  const auto dims = check_positions(kGatedBackwardOp, positions, "grad_y", grad_y, 0, 1,
                                    /*check_values=*/false);
  check_activation_dtype(kGatedBackwardOp, "grad_y", grad_y);
  check_rows(kGatedBackwardOp, "gate_rows", gate_rows, dims, "grad_y", grad_y);
  check_same_dtype(kGatedBackwardOp, "gate_rows", gate_rows, "grad_y", grad_y);
  check_rows(kGatedBackwardOp, "up_rows", up_rows, dims, "grad_y", grad_y);
  check_same_dtype(kGatedBackwardOp, "up_rows", up_rows, "grad_y", grad_y);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor rows = flat_rows(positions, dims.tokens);
  const Tensor g = gather_rows(grad_y, rows);
  Tensor grad_gate, grad_up;
  if (output_mask[0])
    grad_gate = scatter_rows(activate_backward(g * up_rows, gate_rows, act), rows, grad_y.sizes());
  if (output_mask[1]) grad_up = scatter_rows(g * activate(gate_rows, act), rows, grad_y.sizes());
  return {grad_gate, grad_up};
}

}  // namespace

// Backend-generic: ATen's own kernels do the work on CPU and CUDA.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("token_subset_activation", &token_subset_activation);
  m.impl("token_subset_activation_backward", &token_subset_activation_backward);
  m.impl("token_subset_gated_activation", &token_subset_gated_activation);
  m.impl("token_subset_gated_activation_backward", &token_subset_gated_activation_backward);
}

}  // namespace pypeft
