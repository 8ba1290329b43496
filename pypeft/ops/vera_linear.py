"""pypeft::vera_linear: a frozen linear layer plus a VeRA update, in one op.

    y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ)

A ([r, max_in]) and B ([max_out, r]) are frozen random matrices shared by
every adapted layer, sliced per layer: A_s = A[:, :in], B_s = B[:out, :]. Only
λ_d ([r]) and λ_b ([out]) train. Saved for backward: u = drop(x) A_sᵀ
([..., r]) and nothing of size N×in or N×out: both vectors' gradients come
from gᵀu ([out, r]), grad_x needs only g and the regenerated dropout mask. (x
itself is kept only if the frozen weight is made to require grad.) It runs on
lora_linear's kernels with B_eff = diag(λ_b) B_s diag(λ_d).

dtypes as lora_linear: A, B, λ_d, λ_b share x's dtype, or float32 when x is
bfloat16/float16.

An NF4 base (QLoRA) as lora_linear's: with weight_absmax given, weight holds
uint8 NF4 codes [out, in // 2] and the frozen products run tile by tile of its
rows (no full-precision W). Saved for backward: u, as before (x is never kept
then: an NF4 weight takes no gradient).
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks, saved_inputs
from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.vera_linear.default
_backward_op = torch.ops.pypeft.vera_linear_backward.default
_OP, _BACKWARD_OP = "pypeft.vera_linear", "pypeft.vera_linear_backward"


def vera_linear(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p: float = 0.0, seed=None, *,
                weight_absmax: torch.Tensor | None = None, weight_blocksize: int = 64):
    """y = x @ weight.T + bias + lambda_b * ((lambda_d * (dropout(x) @ A_s.T)) @ B_s.T).

    weight: [out, in], or (weight_absmax given: float32, one per
    weight_blocksize values) NF4 codes uint8 [out, in // 2].
    """
    return _op(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed, weight_absmax,
               weight_blocksize)[0]


@torch.library.register_fake("pypeft::vera_linear")
def _vera_linear_fake(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed, weight_absmax=None,
                      weight_blocksize=64):
    _checks.check_vera_linear_args(_OP, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed,
                                   weight_absmax, weight_blocksize)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((*x.shape[:-1], vera_a.shape[0]))


@torch.library.register_fake("pypeft::vera_linear_backward")
def _vera_linear_backward_fake(grad_out, grad_u, x, weight, vera_a, vera_b, lambda_d, lambda_b, u, dropout_p,
                               seed, output_mask, row_ids=None, weight_absmax=None, weight_blocksize=64):
    _checks.check_vera_shared(_BACKWARD_OP, weight, vera_a, vera_b, lambda_d, lambda_b, x, weight_absmax)
    out, n_in = weight.shape[0], _checks.weight_in_features(weight, weight_absmax)
    _checks.check_lora_linear_backward_args(_BACKWARD_OP, grad_out, grad_u, x, weight, vera_a[:, :n_in],
                                            vera_b[:out], u, 1.0, dropout_p, seed, row_ids, "vera_a", "vera_b",
                                            weight_absmax, weight_blocksize)
    need_x, need_weight, need_bias, need_ld, need_lb = output_mask
    _checks.check_no_nf4_weight_grad(_BACKWARD_OP, weight_absmax, need_weight)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None,
        x.new_empty((weight.shape[0],)) if need_bias else None,
        torch.empty_like(lambda_d) if need_ld else None,
        torch.empty_like(lambda_b) if need_lb else None,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed, weight_absmax, weight_blocksize = inputs
    _checks.refuse_nf4_state_grad(_OP, ctx.needs_input_grad[9])
    ctx.keep_x = ctx.needs_input_grad[1]  # grad_weight = gᵀx is the only use of x's values
    ctx.x_recipe, x_saved = saved_inputs.plan(x) if ctx.keep_x else (None, ())
    ctx.x_shape, ctx.x_dtype = tuple(x.shape), x.dtype
    ctx.save_for_backward(weight, vera_a, vera_b, lambda_d, lambda_b, output[1], seed, weight_absmax, *x_saved)
    ctx.dropout_p = dropout_p
    ctx.weight_blocksize = weight_blocksize


def _x_stand_in(ctx, device):
    """A tensor with x's shape, dtype and device but one row of storage: the
    backward kernels read only its metadata when grad_weight is not asked for
    (the unit stride in the last dim keeps them from copying it)."""
    return torch.empty(ctx.x_shape[-1], dtype=ctx.x_dtype, device=device).expand(ctx.x_shape)


def _backward(ctx, grad_y, grad_u):
    weight, vera_a, vera_b, lambda_d, lambda_b, u, seed, weight_absmax, *x_saved = ctx.saved_tensors
    x = saved_inputs.rebuild(ctx.x_recipe, tuple(x_saved)) if ctx.keep_x else _x_stand_in(ctx, u.device)
    need = ctx.needs_input_grad
    if need[3] or need[4]:
        raise RuntimeError("pypeft.vera_linear: the shared matrices vera_a and vera_b are frozen; "
                           "they must not require grad")
    grad_x, grad_weight, grad_bias, grad_ld, grad_lb = _backward_op(
        grad_y, grad_u, x, weight, vera_a, vera_b, lambda_d, lambda_b, u, ctx.dropout_p, seed,
        [need[0], need[1], need[2], need[5], need[6]], None, weight_absmax, ctx.weight_blocksize,
    )
    return grad_x, grad_weight, grad_bias, None, None, grad_ld, grad_lb, None, None, None, None


torch.library.register_autograd("pypeft::vera_linear", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::vera_linear_backward", "pypeft.vera_linear")
