// The op catalogue: every pypeft schema, in one place. Kernels register
// against these names in cpu/ and cuda/; the Python face (pypeft/ops/) adds
// fake (meta) kernels and autograd. Forward and backward are both ops so that
// a Python-free TorchScript runtime can run them and torch.compile can trace
// the autograd formula.
#include <torch/library.h>

TORCH_LIBRARY(pypeft, m) {
  // y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ, and u = drop(x) Aᵀ, saved for backward.
  // drop() keeps element (row, col) by a counter hash of (seed, row, col) and
  // scales kept ones by 1 / (1 - dropout_p); seed: 0-dim int64 tensor, needed
  // when dropout_p > 0.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, float dropout_p, Tensor? seed) -> (Tensor y, Tensor u)");
  // Gradients of lora_linear for (x, weight, bias, lora_a, lora_b), each computed
  // only where output_mask says so (an undefined tensor / None otherwise).
  // grad_u, the gradient flowing into the auxiliary output u, may be None.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor? grad_u, Tensor x, Tensor weight, "
      "Tensor lora_a, Tensor lora_b, Tensor u, float scale, float dropout_p, Tensor? seed, "
      "bool[5] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_lora_a, Tensor grad_lora_b)");

  // VeRA: y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ), u = drop(x) A_sᵀ, where
  // A [r, max_in] and B [max_out, r] are frozen matrices shared by every layer,
  // sliced to A_s = A[:, :in], B_s = B[:out, :]. Dropout as in lora_linear.
  m.def(
      "vera_linear(Tensor x, Tensor weight, Tensor? bias, Tensor vera_a, Tensor vera_b, "
      "Tensor lambda_d, Tensor lambda_b, float dropout_p, Tensor? seed) -> (Tensor y, Tensor u)");
  // Gradients for (x, weight, bias, lambda_d, lambda_b) where output_mask says.
  m.def(
      "vera_linear_backward(Tensor grad_out, Tensor? grad_u, Tensor x, Tensor weight, "
      "Tensor vera_a, Tensor vera_b, Tensor lambda_d, Tensor lambda_b, Tensor u, float dropout_p, "
      "Tensor? seed, bool[5] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_lambda_d, Tensor grad_lambda_b)");

  // Mixed-adapter batches (inference only; no backward op): each batch row b of
  // x [B, ..., in] runs with its own adapter k = row_adapter[b], or with none
  // when k == -1, whose rows equal torch.nn.functional.linear bit for bit.
  // LoRA: K adapters of their own ranks, y[b] += scale[k] · (x[b] A_kᵀ) B_kᵀ.
  m.def(
      "lora_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_a, "
      "Tensor[] lora_b, float[] scale, SymInt[] row_adapter) -> Tensor");
  // VeRA: the shared A, B sliced as in vera_linear; λ_d [K, r] and λ_b [K, out]
  // stack the K adapters' vectors: y[b] += λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ).
  m.def(
      "vera_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor vera_a, Tensor vera_b, "
      "Tensor lambda_d, Tensor lambda_b, SymInt[] row_adapter) -> Tensor");
}
