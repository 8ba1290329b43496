"""TokenTune's linear layers: pypeft::token_subset_linear, token_subset_lora_linear
and token_subset_vera_linear, plain or with a LoRA / VeRA adapter.

x is [B, T, in]; positions [B, k] (int64, in [0, T), distinct within a row)
names the selected tokens. Forward computes every token exactly as the plain
op does (torch.nn.functional.linear, pypeft.ops.lora_linear,
pypeft.ops.vera_linear): y equals the unpatched layer's output. Backward
treats the unselected tokens' computations as constants: grad_x is zero at
them, and parameter gradients sum over the selected tokens only. The adapter's
dropout mask is keyed by the flat row b * T + t of x, as lora_linear keys it;
backward, running on the selected rows alone, regenerates that same mask from
their row ids.

Saved for backward: the selected rows only, nothing with B * T rows. x_rows
([B * k, in]) when a gradient reads it (grad_weight; LoRA's grad_lora_a), one
copy shared by every op reading the same x at the same positions (a layer's
query, key and value projections; see token_rows.py); u_rows = drop(x_rows) Aᵀ
([B * k, r]) for adapters. Second-order gradients are not supported.

dtypes as lora_linear: x, weight and bias share one dtype, float32, float64 or
bfloat16 (float16 too on CUDA). The adapter's tensors (lora_a, lora_b; vera_a,
vera_b, lambda_d, lambda_b) share x's dtype, or float32 when x is
bfloat16/float16; their gradients come back in their own dtype. Any other mix
raises a TypeError naming the argument; bad shapes or positions (wrong dtype or
batch, out of [0, T), repeated in a row, more than T per row) a ValueError.

An NF4 base (QLoRA), every op here: with the keyword weight_absmax given
(float32, one per weight_blocksize values), weight holds uint8 NF4 codes
[out, in // 2]; the frozen products run tile by tile of W's rows (no
full-precision W), the same rows are saved, and the weight takes no gradient.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward
from pypeft.ops.token_rows import shared_rows

_linear_op = torch.ops.pypeft.token_subset_linear.default
_linear_backward_op = torch.ops.pypeft.token_subset_linear_backward.default
_lora_op = torch.ops.pypeft.token_subset_lora_linear.default
_lora_backward_op = torch.ops.pypeft.token_subset_lora_linear_backward.default
_vera_op = torch.ops.pypeft.token_subset_vera_linear.default
_vera_backward_op = torch.ops.pypeft.token_subset_vera_linear_backward.default


def token_subset_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        positions: torch.Tensor, *, weight_absmax: torch.Tensor | None = None,
                        weight_blocksize: int = 64) -> torch.Tensor:
    """y = x @ weight.T + bias, differentiable at the selected tokens only.

    Args:
        x: [B, T, in] activations.
        weight: [out, in], or (weight_absmax given) NF4 codes uint8 [out, in // 2];
            bias: [out] or None.
        positions: [B, k] int64, the selected tokens of each batch row.
        weight_absmax: float32 [ceil(out * in / weight_blocksize)], the NF4
            weight's absmax (None: weight is dense).
        weight_blocksize: values per absmax of the NF4 weight (QLoRA: 64).
    Returns:
        y: [B, T, out].
    """
    return _linear_op(x, weight, bias, positions, weight_absmax, weight_blocksize)[0]


def token_subset_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                             dropout_p: float, seed: torch.Tensor | None,
                             positions: torch.Tensor, *, weight_absmax: torch.Tensor | None = None,
                             weight_blocksize: int = 64) -> torch.Tensor:
    """pypeft.ops.lora_linear (y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ),
    differentiable at the selected tokens only.

    Args as lora_linear (lora_a [r, in], lora_b [out, r]; seed a 0-dim int64
    tensor, needed when dropout_p > 0; an NF4 weight with weight_absmax and
    weight_blocksize), plus positions [B, k] int64.
    Returns:
        y: [B, T, out].
    """
    return _lora_op(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, positions, weight_absmax,
                    weight_blocksize)[0]


def token_subset_vera_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             vera_a: torch.Tensor, vera_b: torch.Tensor, lambda_d: torch.Tensor,
                             lambda_b: torch.Tensor, dropout_p: float, seed: torch.Tensor | None,
                             positions: torch.Tensor, *, weight_absmax: torch.Tensor | None = None,
                             weight_blocksize: int = 64) -> torch.Tensor:
    """pypeft.ops.vera_linear (y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ)),
    differentiable at the selected tokens only.

    Args as vera_linear (the shared, frozen vera_a [r, max_in] and vera_b
    [max_out, r]; lambda_d [r], lambda_b [out]; an NF4 weight with
    weight_absmax and weight_blocksize), plus positions [B, k] int64.
    Returns:
        y: [B, T, out].
    """
    return _vera_op(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed, positions,
                    weight_absmax, weight_blocksize)[0]


# --- fake (meta) kernels: the checks of csrc/token_subset_linear.cpp ----------------------

_LINEAR, _LORA, _VERA = ("pypeft.token_subset_linear", "pypeft.token_subset_lora_linear",
                         "pypeft.token_subset_vera_linear")


def _check_tokens_layout(op, arg, t, features):
    _checks.check_defined(op, arg, t)
    _checks.check_value(t.dim() == 3, op, arg, f"a 3-D tensor [batch, tokens, {features}]",
                        f"{t.dim()}-D tensor of shape {_checks.shape_str(t.shape)}")


def _check_selection(op, x, positions):
    _check_tokens_layout(op, "x", x, "in_features")
    _checks.check_positions(op, positions, "x", x)


def _check_selected_grad(op, grad_y, weight, positions, weight_absmax):
    _check_tokens_layout(op, "grad_y", grad_y, "out_features")
    _checks.check_activation_dtype(op, "grad_y", grad_y)
    _checks.check_dim(op, "weight", weight, 2)
    _checks.check_size(op, "grad_y", grad_y, 2, weight.shape[0], "out_features, from weight [out, in]")
    _checks.check_same_device(op, "weight", weight, "grad_y", grad_y)
    if weight_absmax is None:
        _checks.check_dense_weight_dtype(op, weight, grad_y, "grad_y")
    else:  # codes here; they and the absmax are checked against x_rows later
        _checks.check_weight_form(op, weight, weight_absmax)
    _checks.check_positions(op, positions, "grad_y", grad_y)


def _check_saved_rows(op, arg, t, rows, cols, grad_y):
    _checks.check_shape(op, arg, t, (rows, cols), " (one row per selected token)")
    _checks.check_like(op, arg, t, "grad_y", grad_y)


def _x_rows_operand(op, x_rows, rows, n_in, grad_y, values_needed):
    """x_rows as the kernels see it: the empty [0] stand-in when its values
    are not needed (then a tensor of x_rows' shape takes its place)."""
    _checks.check_defined(op, "x_rows", x_rows)
    if not values_needed and x_rows.dim() == 1 and x_rows.shape[0] == 0:
        _checks.check_same_device(op, "x_rows", x_rows, "grad_y", grad_y)
        return grad_y.new_empty((n_in,)).expand(rows, n_in)
    _check_saved_rows(op, "x_rows", x_rows, rows, n_in, grad_y)
    return x_rows


def _selected_rows(positions):
    return positions.shape[0] * positions.shape[1]


def _rows_like(x, positions, cols):
    """An empty [B * k, cols] tensor in x's dtype, on its device."""
    return x.new_empty((x.shape[0] * positions.shape[1], cols))


def _grad_x_like(grad_y, weight, weight_absmax):
    return grad_y.new_empty((*grad_y.shape[:-1], _checks.weight_in_features(weight, weight_absmax)))


def _grad_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("pypeft::token_subset_linear")
def _linear_fake(x, weight, bias, positions, weight_absmax=None, weight_blocksize=64):
    _checks.check_linear_args(_LINEAR, x, weight, bias, weight_absmax, weight_blocksize)
    _check_selection(_LINEAR, x, positions)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), _rows_like(x, positions, x.shape[2])


@torch.library.register_fake("pypeft::token_subset_linear_backward")
def _linear_backward_fake(grad_y, x_rows, weight, positions, output_mask, weight_absmax=None, weight_blocksize=64):
    op = _LINEAR + "_backward"
    need_x, need_weight, need_bias = output_mask
    _check_selected_grad(op, grad_y, weight, positions, weight_absmax)
    n_in = _checks.weight_in_features(weight, weight_absmax)
    xr = _x_rows_operand(op, x_rows, _selected_rows(positions), n_in, grad_y, need_weight)
    if weight_absmax is not None:
        _checks.check_nf4_weight(op, weight, weight_absmax, weight_blocksize, xr, "x_rows", _checks.NF4_BASE_ARGS)
    _checks.check_no_nf4_weight_grad(op, weight_absmax, need_weight)
    return (
        _grad_x_like(grad_y, weight, weight_absmax) if need_x else None,
        _grad_like(weight) if need_weight else None,
        grad_y.new_empty((weight.shape[0],)) if need_bias else None,
    )


@torch.library.register_fake("pypeft::token_subset_lora_linear")
def _lora_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, positions, weight_absmax=None,
               weight_blocksize=64):
    _checks.check_lora_linear_args(_LORA, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
                                   weight_absmax=weight_absmax, weight_blocksize=weight_blocksize)
    _check_selection(_LORA, x, positions)
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), _rows_like(x, positions, x.shape[2]),
            _rows_like(x, positions, lora_a.shape[0]))


@torch.library.register_fake("pypeft::token_subset_lora_linear_backward")
def _lora_backward_fake(grad_y, x_rows, weight, lora_a, lora_b, u_rows, scale, dropout_p, seed, positions,
                        output_mask, weight_absmax=None, weight_blocksize=64):
    op = _LORA + "_backward"
    need_x, need_weight, need_bias, need_a, need_b = output_mask
    _check_selected_grad(op, grad_y, weight, positions, weight_absmax)
    n = _selected_rows(positions)
    xr = _x_rows_operand(op, x_rows, n, _checks.weight_in_features(weight, weight_absmax), grad_y,
                         need_weight or need_a)
    _checks.check_lora_linear_args(op, xr, weight, None, lora_a, lora_b, scale, dropout_p, seed,
                                   weight_absmax=weight_absmax, weight_blocksize=weight_blocksize)
    _check_saved_rows(op, "u_rows", u_rows, n, lora_a.shape[0], grad_y)
    _checks.check_no_nf4_weight_grad(op, weight_absmax, need_weight)
    return (
        _grad_x_like(grad_y, weight, weight_absmax) if need_x else None,
        _grad_like(weight) if need_weight else None,
        grad_y.new_empty((weight.shape[0],)) if need_bias else None,
        _grad_like(lora_a) if need_a else None,
        _grad_like(lora_b) if need_b else None,
    )


@torch.library.register_fake("pypeft::token_subset_vera_linear")
def _vera_fake(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed, positions, weight_absmax=None,
               weight_blocksize=64):
    _checks.check_vera_linear_args(_VERA, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed,
                                   weight_absmax, weight_blocksize)
    _check_selection(_VERA, x, positions)
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), _rows_like(x, positions, x.shape[2]),
            _rows_like(x, positions, vera_a.shape[0]))


@torch.library.register_fake("pypeft::token_subset_vera_linear_backward")
def _vera_backward_fake(grad_y, x_rows, weight, vera_a, vera_b, lambda_d, lambda_b, u_rows, dropout_p, seed,
                        positions, output_mask, weight_absmax=None, weight_blocksize=64):
    op = _VERA + "_backward"
    need_x, need_weight, need_bias, need_ld, need_lb = output_mask
    _check_selected_grad(op, grad_y, weight, positions, weight_absmax)
    n = _selected_rows(positions)
    xr = _x_rows_operand(op, x_rows, n, _checks.weight_in_features(weight, weight_absmax), grad_y, need_weight)
    _checks.check_vera_linear_args(op, xr, weight, None, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed,
                                   weight_absmax, weight_blocksize)
    _check_saved_rows(op, "u_rows", u_rows, n, vera_a.shape[0], grad_y)
    _checks.check_no_nf4_weight_grad(op, weight_absmax, need_weight)
    return (
        _grad_x_like(grad_y, weight, weight_absmax) if need_x else None,
        _grad_like(weight) if need_weight else None,
        grad_y.new_empty((weight.shape[0],)) if need_bias else None,
        _grad_like(lambda_d) if need_ld else None,
        _grad_like(lambda_b) if need_lb else None,
    )


# --- autograd ----------------------------------------------------------------------------

def _saved_x_rows(x, positions, x_rows, values_needed):
    """What to save of x: its selected rows, shared with other ops reading this
    x, when a gradient reads their values; otherwise nothing."""
    return shared_rows(x, positions, x_rows) if values_needed else None


def _x_rows_arg(saved, like):
    """The backward op's x_rows: the saved rows, or the empty [0] tensor that
    says their values are not needed (the op then reads only shapes)."""
    return saved if saved is not None else like.new_empty((0,))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, positions, weight_absmax, weight_blocksize = inputs
    _checks.refuse_nf4_state_grad(_LINEAR, ctx.needs_input_grad[4])
    # The gathered rows are outputs only so that they can be saved and shared;
    # no gradient flows back through them.
    ctx.mark_non_differentiable(output[1])
    x_rows = _saved_x_rows(x, positions, output[1], ctx.needs_input_grad[1])
    ctx.save_for_backward(weight, positions, x_rows, weight_absmax)
    ctx.weight_blocksize = weight_blocksize


def _linear_backward(ctx, grad_y, _grad_x_rows):
    weight, positions, x_rows, weight_absmax = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_weight, grad_bias = _linear_backward_op(
        grad_y, _x_rows_arg(x_rows, grad_y), weight, positions, [need[0], need[1], need[2]], weight_absmax,
        ctx.weight_blocksize)
    return grad_x, grad_weight, grad_bias, None, None, None


def _lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, positions, weight_absmax, weight_blocksize = inputs
    _checks.refuse_nf4_state_grad(_LORA, ctx.needs_input_grad[9])
    _, x_rows, u_rows = output
    ctx.mark_non_differentiable(x_rows, u_rows)
    need = ctx.needs_input_grad
    x_rows = _saved_x_rows(x, positions, x_rows, need[1] or need[3])  # grad_weight, grad_lora_a
    ctx.save_for_backward(weight, lora_a, lora_b, u_rows, seed, positions, x_rows, weight_absmax)
    ctx.scale, ctx.dropout_p, ctx.weight_blocksize = scale, dropout_p, weight_blocksize


def _lora_backward(ctx, grad_y, _grad_x_rows, _grad_u_rows):
    weight, lora_a, lora_b, u_rows, seed, positions, x_rows, weight_absmax = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _lora_backward_op(grad_y, _x_rows_arg(x_rows, u_rows), weight, lora_a, lora_b, u_rows, ctx.scale,
                              ctx.dropout_p, seed, positions, [need[0], need[1], need[2], need[3], need[4]],
                              weight_absmax, ctx.weight_blocksize)
    return (*grads, None, None, None, None, None, None)


def _vera_setup_context(ctx, inputs, output):
    x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed, positions, weight_absmax, \
        weight_blocksize = inputs
    _checks.refuse_nf4_state_grad(_VERA, ctx.needs_input_grad[10])
    _, x_rows, u_rows = output
    ctx.mark_non_differentiable(x_rows, u_rows)
    x_rows = _saved_x_rows(x, positions, x_rows, ctx.needs_input_grad[1])  # grad_weight only
    ctx.save_for_backward(weight, vera_a, vera_b, lambda_d, lambda_b, u_rows, seed, positions, x_rows, weight_absmax)
    ctx.dropout_p, ctx.weight_blocksize = dropout_p, weight_blocksize


def _vera_backward(ctx, grad_y, _grad_x_rows, _grad_u_rows):
    weight, vera_a, vera_b, lambda_d, lambda_b, u_rows, seed, positions, x_rows, weight_absmax = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[3] or need[4]:
        raise RuntimeError("pypeft.token_subset_vera_linear: the shared matrices vera_a and vera_b are frozen; "
                           "they must not require grad")
    grad_x, grad_weight, grad_bias, grad_ld, grad_lb = _vera_backward_op(
        grad_y, _x_rows_arg(x_rows, u_rows), weight, vera_a, vera_b, lambda_d, lambda_b, u_rows, ctx.dropout_p,
        seed, positions, [need[0], need[1], need[2], need[5], need[6]], weight_absmax, ctx.weight_blocksize)
    return grad_x, grad_weight, grad_bias, None, None, grad_ld, grad_lb, None, None, None, None, None


torch.library.register_autograd("pypeft::token_subset_linear", _linear_backward,
                                setup_context=_linear_setup_context)
torch.library.register_autograd("pypeft::token_subset_lora_linear", _lora_backward,
                                setup_context=_lora_setup_context)
torch.library.register_autograd("pypeft::token_subset_vera_linear", _vera_backward,
                                setup_context=_vera_setup_context)

forbid_double_backward("pypeft::token_subset_linear_backward", "pypeft.token_subset_linear")
forbid_double_backward("pypeft::token_subset_lora_linear_backward", "pypeft.token_subset_lora_linear")
forbid_double_backward("pypeft::token_subset_vera_linear_backward", "pypeft.token_subset_vera_linear")
