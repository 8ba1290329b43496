"""pypeft::lora_linear_mixed and pypeft::vera_linear_mixed: mixed-adapter
batches for serving, where each batch row runs with its own adapter.

    row b of x [B, ..., in], k = row_adapter[b]:
      k == -1:  y[b] = x[b] Wᵀ + b                      (bit for bit F.linear)
      LoRA:     y[b] = x[b] Wᵀ + b + scale[k] · (x[b] A_kᵀ) B_kᵀ
      VeRA:     y[b] = x[b] Wᵀ + b + λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ)

One op call per layer; the loop over adapters runs in C++ (csrc/mixed_linear.cpp).
Inference only: no dropout, and no gradient — backward through either op
raises a RuntimeError that says so (run them under torch.no_grad() or
torch.inference_mode(); train an adapter with lora_linear / vera_linear).

dtypes: x, weight and bias share one dtype: float32, float64 or bfloat16
(float16 too on CUDA). Each adapter's tensors share one dtype: x's, or float32
when x is bfloat16/float16; the adapter part is computed in that dtype and
added to y in y's dtype. Any other mix raises a TypeError naming the argument.
All tensors live on x's device.

row_adapter is a list of Python ints, so torch.compile specialises on it
(guards on its values): a compiled layer recompiles for each new assignment.
"""

from __future__ import annotations

import torch

_lora_op = torch.ops.pypeft.lora_linear_mixed.default
_vera_op = torch.ops.pypeft.vera_linear_mixed.default


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: list[float],
    row_adapter: list[int],
) -> torch.Tensor:
    """A linear layer whose batch rows each run with their own LoRA adapter.

    Args:
        x: [B, ..., in] activations, at least 2-D; dim 0 indexes batch rows.
        weight: [out, in] frozen base weight; bias: [out] or None.
        lora_a: K tensors, lora_a[k] of shape [r_k, in] (ranks may differ).
        lora_b: K tensors, lora_b[k] of shape [out, r_k].
        scale: K floats, the adapters' LoRA scalings (alpha / r, ...).
        row_adapter: B ints in [-1, K): the adapter of each batch row; -1 runs
            the row through the base layer alone.
    Returns:
        y: [B, ..., out], y[b] = x[b] Wᵀ + bias + scale[k] · (x[b] A_kᵀ) B_kᵀ
        with k = row_adapter[b]; rows with k = -1 equal F.linear bit for bit.
    """
    return _lora_op(x, weight, bias, lora_a, lora_b, scale, row_adapter)


def vera_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    row_adapter: list[int],
) -> torch.Tensor:
    """A linear layer whose batch rows each run with their own VeRA adapter.

    Args:
        x: [B, ..., in] activations, at least 2-D; dim 0 indexes batch rows.
        weight: [out, in] frozen base weight; bias: [out] or None.
        vera_a: [r, max_in], vera_b: [max_out, r]: the frozen matrices shared
            by every adapter, sliced to A_s = vera_a[:, :in], B_s = vera_b[:out].
        lambda_d: [K, r], lambda_b: [K, out]: the K adapters' vectors, stacked.
        row_adapter: B ints in [-1, K): the adapter of each batch row; -1 runs
            the row through the base layer alone.
    Returns:
        y: [B, ..., out], y[b] = x[b] Wᵀ + bias + λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ)
        with k = row_adapter[b]; rows with k = -1 equal F.linear bit for bit.
    """
    return _vera_op(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter)


def _check_fake_args(label, x, weight, row_adapter):
    torch._check(x.dim() >= 2, lambda: f"{label}: argument 'x': expected [batch, ..., in_features], at least 2-D")
    torch._check(weight.dim() == 2, lambda: f"{label}: argument 'weight': expected a 2-D tensor")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"{label}: argument 'x': expected in_features {weight.shape[1]}")
    torch._check(x.shape[0] == len(row_adapter),
                 lambda: f"{label}: argument 'row_adapter': expected one entry per batch row (x.size(0))")


@torch.library.register_fake("pypeft::lora_linear_mixed")
def _lora_linear_mixed_fake(x, weight, bias, lora_a, lora_b, scale, row_adapter):
    _check_fake_args("pypeft.lora_linear_mixed", x, weight, row_adapter)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pypeft::vera_linear_mixed")
def _vera_linear_mixed_fake(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter):
    _check_fake_args("pypeft.vera_linear_mixed", x, weight, row_adapter)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _register_inference_only(op: str, label: str, train_with: str) -> None:
    """An autograd formula that raises: a user who runs the op on tensors
    requiring grad gets its output (marked as requiring grad) and a clear error
    at backward, never a silent zero gradient."""

    def backward(ctx, grad_y):
        raise RuntimeError(
            f"{label}: mixed-adapter batches are for inference; the op has no gradient. "
            f"Run it under torch.no_grad() or torch.inference_mode(), and train an adapter "
            f"with {train_with}.")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


_register_inference_only("pypeft::lora_linear_mixed", "pypeft.lora_linear_mixed", "pypeft.ops.lora_linear")
_register_inference_only("pypeft::vera_linear_mixed", "pypeft.vera_linear_mixed", "pypeft.ops.vera_linear")
