"""pypeft::lora_linear: a frozen linear layer plus a LoRA update, in one op.

    y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ

Saved for backward: x and u = drop(x) Aᵀ ([..., r]) only — and where x is the
output of a GELU or a product whose inputs autograd keeps anyway, those instead
of x (see saved_inputs.py). The dropout mask is
a counter hash of (seed, row, column), regenerated in backward, identical on
CPU and CUDA for the same seed.

dtypes: x, weight and bias share one dtype: float32, float64 or bfloat16
(float16 too on CUDA). lora_a and lora_b share one dtype: x's, or float32 when
x is bfloat16/float16 (fp32 adapter weights beside low-precision activations);
the adapter products then run in x's dtype and their gradients come back in
float32. Any other mix raises a TypeError naming the argument.

An NF4 base (QLoRA): with weight_absmax given, weight holds uint8 NF4 codes
[out, in // 2] (pypeft.ops.nf4_quantize's, viewed as rows) and weight_absmax
their float32 scales, one per weight_blocksize values. The frozen products
x Wᵀ and grad_y W then run tile by tile of W's rows, dequantised into x's
dtype: no full-precision copy of W exists, in forward or backward. Saved for
backward as before: x and u (the codes and absmax are the layer's own
parameters / buffers). W is frozen: no gradient flows to it or to its absmax.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks, saved_inputs
from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.lora_linear.default
_backward_op = torch.ops.pypeft.lora_linear_backward.default
_OP, _BACKWARD_OP = "pypeft.lora_linear", "pypeft.lora_linear_backward"


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    weight_absmax: torch.Tensor | None = None,
    weight_blocksize: int = 64,
) -> torch.Tensor:
    """y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T.

    Args:
        x: [..., in] activations.
        weight: [out, in] frozen base weight, or (weight_absmax given) its NF4
            codes, uint8 [out, in // 2]; bias: [out] or None.
        lora_a: [r, in]; lora_b: [out, r].
        scale: the LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the adapter's input, in [0, 1).
        seed: 0-dim int64 tensor choosing the dropout mask (needed when
            dropout_p > 0); a tensor, so torch.compile does not recompile as it
            changes every step.
        weight_absmax: float32 [ceil(out * in / weight_blocksize)], the NF4
            weight's absmax (None: weight is dense).
        weight_blocksize: values per absmax of the NF4 weight (QLoRA: 64).
    Returns:
        y: [..., out].
    """
    return _op(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, weight_absmax, weight_blocksize)[0]


@torch.library.register_fake("pypeft::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, weight_absmax=None,
                      weight_blocksize=64):
    _checks.check_lora_linear_args(_OP, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
                                   weight_absmax=weight_absmax, weight_blocksize=weight_blocksize)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    u = x.new_empty((*x.shape[:-1], lora_a.shape[0]))
    return y, u


@torch.library.register_fake("pypeft::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, grad_u, x, weight, lora_a, lora_b, u, scale, dropout_p,
                               seed, output_mask, row_ids=None, weight_absmax=None, weight_blocksize=64):
    _checks.check_lora_linear_backward_args(_BACKWARD_OP, grad_out, grad_u, x, weight, lora_a, lora_b, u, scale,
                                            dropout_p, seed, row_ids, weight_absmax=weight_absmax,
                                            weight_blocksize=weight_blocksize)
    need_x, need_weight, need_bias, need_a, need_b = output_mask
    _checks.check_no_nf4_weight_grad(_BACKWARD_OP, weight_absmax, need_weight)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None,
        x.new_empty((weight.shape[0],)) if need_bias else None,
        torch.empty_like(lora_a, memory_format=torch.contiguous_format) if need_a else None,
        torch.empty_like(lora_b, memory_format=torch.contiguous_format) if need_b else None,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, weight_absmax, weight_blocksize = inputs
    _, u = output
    _checks.refuse_nf4_state_grad(_OP, ctx.needs_input_grad[8])
    ctx.x_recipe, x_saved = saved_inputs.plan(x)
    # weight_absmax, like weight, is the layer's own state: saving it costs nothing.
    ctx.save_for_backward(weight, lora_a, lora_b, u, seed, weight_absmax, *x_saved)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.weight_blocksize = weight_blocksize


def _backward(ctx, grad_y, grad_u):
    weight, lora_a, lora_b, u, seed, weight_absmax, *x_saved = ctx.saved_tensors
    x = saved_inputs.rebuild(ctx.x_recipe, tuple(x_saved))
    need = ctx.needs_input_grad
    grad_x, grad_weight, grad_bias, grad_a, grad_b = _backward_op(
        grad_y, grad_u, x, weight, lora_a, lora_b, u, ctx.scale, ctx.dropout_p, seed,
        [need[0], need[1], need[2], need[3], need[4]], None, weight_absmax, ctx.weight_blocksize,
    )
    return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None, None, None, None


torch.library.register_autograd("pypeft::lora_linear", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::lora_linear_backward", "pypeft.lora_linear")
