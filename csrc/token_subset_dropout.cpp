// pypeft::token_subset_dropout (TokenTune), for every backend at once.
//
// Forward is counter_dropout over x viewed as [B * T, F]: the mask of element
// (b, t, f) is a hash of (seed, b * T + t, f). Backward regenerates it for the
// selected rows only, by handing counter_dropout their flat row ids, and
// scatters them into a zero grad_x. Nothing but the seed and the positions is
// saved. The mask work runs in counter_dropout's CPU and CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "pypeft/op_handles.h"
#include "pypeft/token_subset.h"

namespace pypeft {
namespace {

constexpr const char* kOp = "pypeft.token_subset_dropout";
constexpr const char* kBackwardOp = "pypeft.token_subset_dropout_backward";

using Tensor = at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Checked here so that errors name this op and its arguments, not counter_dropout's.
TokenSubsetDims check_dropout_args(const char* op, const char* x_arg, const Tensor& x, double p,
                                   const OptTensor& seed, const Tensor& positions,
                                   bool check_values) {
  const auto dims = check_positions(op, positions, x_arg, x, 0, 1, check_values);
  check_activation_dtype(op, x_arg, x);
  check_probability(op, "p", p);
  check_seed(op, "seed", seed, p > 0.0, x);
  return dims;
}

Tensor token_subset_dropout(const Tensor& x, double p, const OptTensor& seed, const Tensor& positions) {
  const auto dims = check_dropout_args(kOp, "x", x, p, seed, positions, /*check_values=*/true);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // With p = 0 counter_dropout returns a copy: an op's output must not alias its input.
  const Tensor flat = x.reshape({dims.batch * dims.tokens, row_features(x)});
  return ops::counter_dropout().call(flat, p, seed, c10::nullopt).view(x.sizes());
}

Tensor token_subset_dropout_backward(const Tensor& grad_y, double p, const OptTensor& seed,
                                     const Tensor& positions) {
  const auto dims =
      check_dropout_args(kBackwardOp, "grad_y", grad_y, p, seed, positions, /*check_values=*/false);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor rows = flat_rows(positions, dims.tokens);
  const Tensor grad_rows = gather_rows(grad_y, rows);
  // The mask is symmetric and linear: its gradient is the same mask. With p = 0
  // or no elements there is nothing to mask (and counter_dropout counts no
  // rows in a tensor of zero columns, so it would reject the row ids).
  const bool masked = p > 0.0 && grad_rows.numel() > 0;
  const Tensor dropped = masked ? ops::counter_dropout().call(grad_rows, p, seed, rows) : grad_rows;
  return scatter_rows(dropped, rows, grad_y.sizes());
}

}  // namespace

// Backend-generic: the mask is drawn in counter_dropout's CPU and CUDA kernels.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("token_subset_dropout", &token_subset_dropout);
  m.impl("token_subset_dropout_backward", &token_subset_dropout_backward);
}

}  // namespace pypeft
