"""pypeft::token_subset_layer_norm and pypeft::token_subset_rms_norm: TokenTune's
norms over the last dim of x ([B, T, ..., D]).

Forward normalises every token exactly as the plain norm:
- layer_norm as torch.nn.functional.layer_norm(x, (D,), weight, bias, eps);
- rms_norm as transformers' LlamaRMSNorm (also Mistral's, Qwen2's):
  h = x in float32, h = h * rsqrt(mean(h², -1) + eps), y = weight * h.to(x.dtype);
  y's dtype is the result type of weight and x (x's without weight). Only in
  float64 does it differ: it computes in float64 where Llama rounds through
  float32.
Backward (positions [B, k], the selected tokens): grad_x is zero at every
unselected token, grad_weight and grad_bias sum over the selected tokens only.

Saved for backward: the selected rows of x ([B * k, F]), shared with every
other token-subset op saving rows of the same x (token_rows.shared_rows);
mean and rstd are recomputed from them, nothing of B * T rows is kept.

dtypes: x float32, float64 or bfloat16 (float16 too on CUDA); weight and bias
in x's dtype, or float32 beside a bfloat16/float16 x. Other mixes raise a
TypeError naming the argument.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward
from pypeft.ops.token_rows import add_rows_grad, fake_rows, shared_rows

_layer_norm_op = torch.ops.pypeft.token_subset_layer_norm.default
_layer_norm_backward_op = torch.ops.pypeft.token_subset_layer_norm_backward.default
_rms_norm_op = torch.ops.pypeft.token_subset_rms_norm.default
_rms_norm_backward_op = torch.ops.pypeft.token_subset_rms_norm_backward.default


def token_subset_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float, positions: torch.Tensor) -> torch.Tensor:
    """F.layer_norm(x, (D,), weight, bias, eps), differentiable at `positions` only.

    Args:
        x: [B, T, ..., D].
        weight, bias: [D] or None.
        eps: added to the variance.
        positions: [B, k] int64, distinct token indices per batch row.
    Returns:
        y: x's shape and dtype.
    """
    return _layer_norm_op(x, weight, bias, eps, positions)[0]


def token_subset_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                          positions: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm(x) with `weight`, differentiable at `positions` only.

    Args:
        x: [B, T, ..., D].
        weight: [D] or None.
        eps: added to the mean square.
        positions: [B, k] int64, distinct token indices per batch row.
    Returns:
        y: x's shape; dtype the result type of weight and x.
    """
    return _rms_norm_op(x, weight, eps, positions)[0]


# --- fake kernels: the checks of csrc/token_subset_norm.cpp ---------------------------------

_LAYER_NORM, _RMS_NORM = "pypeft.token_subset_layer_norm", "pypeft.token_subset_rms_norm"


def _check_input(op, arg, x, eps):
    """x (or grad_y): [B, T, ..., D], normalised over D."""
    _checks.check_defined(op, arg, x)
    expected, got = "a tensor of shape [B, T, ..., D] with D >= 1", f"shape {_checks.shape_str(x.shape)}"
    _checks.check_value(x.dim() >= 3, op, arg, expected, got)
    _checks.check_value(x.shape[-1] >= 1, op, arg, expected, got)
    _checks.check_activation_dtype(op, arg, x)
    _checks.check_finite(op, "eps", eps)


def _check_param(op, arg, param, features, x_arg, x):
    """weight / bias: [D], in x's dtype or float32 beside a bfloat16/float16 x."""
    if param is None:
        return
    _checks.check_dim(op, arg, param, 1)
    _checks.check_size(op, arg, param, 0, features, "the normalised last dim")
    _checks.check_same_device(op, arg, param, x_arg, x)
    _checks.check_low_precision_partner(op, arg, param, x_arg, x)


def _check_backward_rows(op, grad_y, x_rows, eps, positions):
    _check_input(op, "grad_y", grad_y, eps)
    _checks.check_positions(op, positions, "grad_y", grad_y)
    _checks.check_rows(op, "x_rows", x_rows, positions, "grad_y", grad_y)
    _checks.check_activation_dtype(op, "x_rows", x_rows)


@torch.library.register_fake("pypeft::token_subset_layer_norm")
def _layer_norm_fake(x, weight, bias, eps, positions):
    op = _LAYER_NORM
    _check_input(op, "x", x, eps)
    _check_param(op, "weight", weight, x.shape[-1], "x", x)
    _check_param(op, "bias", bias, x.shape[-1], "x", x)
    if weight is not None and bias is not None:
        _checks.check_same_dtype(op, "bias", bias, "weight", weight)
    _checks.check_positions(op, positions, "x", x)
    return torch.empty_like(x, memory_format=torch.contiguous_format), fake_rows(x, positions)


@torch.library.register_fake("pypeft::token_subset_layer_norm_backward")
def _layer_norm_backward_fake(grad_y, x_rows, weight, bias, eps, positions, output_mask):
    op = _LAYER_NORM + "_backward"
    _check_backward_rows(op, grad_y, x_rows, eps, positions)
    _checks.check_same_dtype(op, "grad_y", grad_y, "x_rows", x_rows)
    _check_param(op, "weight", weight, grad_y.shape[-1], "x_rows", x_rows)
    _check_param(op, "bias", bias, grad_y.shape[-1], "x_rows", x_rows)
    need_x, need_weight, need_bias = output_mask
    return (
        grad_y.new_empty(grad_y.shape, dtype=x_rows.dtype) if need_x else None,
        torch.empty_like(weight) if need_weight and weight is not None else None,
        torch.empty_like(bias) if need_bias and bias is not None else None,
    )


@torch.library.register_fake("pypeft::token_subset_rms_norm")
def _rms_norm_fake(x, weight, eps, positions):
    op = _RMS_NORM
    _check_input(op, "x", x, eps)
    _check_param(op, "weight", weight, x.shape[-1], "x", x)
    _checks.check_positions(op, positions, "x", x)
    dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    return x.new_empty(x.shape, dtype=dtype), fake_rows(x, positions)


@torch.library.register_fake("pypeft::token_subset_rms_norm_backward")
def _rms_norm_backward_fake(grad_y, x_rows, weight, eps, positions, output_mask):
    op = _RMS_NORM + "_backward"
    _check_backward_rows(op, grad_y, x_rows, eps, positions)
    _check_param(op, "weight", weight, grad_y.shape[-1], "x_rows", x_rows)
    need_x, need_weight = output_mask
    return (
        grad_y.new_empty(grad_y.shape, dtype=x_rows.dtype) if need_x else None,
        torch.empty_like(weight) if need_weight and weight is not None else None,
    )


def _save_rows(ctx, x, positions, x_rows, *params):
    # Unused outputs' gradients come as None, not zeros: x_rows' nearly always.
    ctx.set_materialize_grads(False)
    ctx.x_shape = tuple(x.shape)
    ctx.save_for_backward(shared_rows(x, positions, x_rows), positions, *params)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, positions = inputs
    _save_rows(ctx, x, positions, output[1], weight, bias)
    ctx.eps = eps


def _layer_norm_backward(ctx, grad_y, grad_x_rows):
    x_rows, positions, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_weight = grad_bias = None
    if grad_y is not None:
        grad_x, grad_weight, grad_bias = _layer_norm_backward_op(
            grad_y, x_rows, weight, bias, ctx.eps, positions, [need[0], need[1], need[2]])
    if need[0]:
        grad_x = add_rows_grad(grad_x, grad_x_rows, positions, ctx.x_shape)
    return grad_x, grad_weight, grad_bias, None, None


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, positions = inputs
    _save_rows(ctx, x, positions, output[1], weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad_y, grad_x_rows):
    x_rows, positions, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_weight = None
    if grad_y is not None:
        grad_x, grad_weight = _rms_norm_backward_op(grad_y, x_rows, weight, ctx.eps, positions, [need[0], need[1]])
    if need[0]:
        grad_x = add_rows_grad(grad_x, grad_x_rows, positions, ctx.x_shape)
    return grad_x, grad_weight, None, None


torch.library.register_autograd("pypeft::token_subset_layer_norm", _layer_norm_backward,
                                setup_context=_layer_norm_setup_context)
torch.library.register_autograd("pypeft::token_subset_rms_norm", _rms_norm_backward,
                                setup_context=_rms_norm_setup_context)

forbid_double_backward("pypeft::token_subset_layer_norm_backward", "pypeft.token_subset_layer_norm")
forbid_double_backward("pypeft::token_subset_rms_norm_backward", "pypeft.token_subset_rms_norm")
