"""pypeft::token_subset_activation and pypeft::token_subset_gated_activation:
TokenTune's elementwise activations on x ([B, T, ...]).

kind: "gelu" (erf; torch.nn.functional.gelu), "gelu_tanh" (F.gelu with
approximate="tanh", which transformers' "gelu_new" / NewGELUActivation equals
within float tolerance), "silu", "relu". The gated one is act(gate) * up, the
Llama / Mistral MLP with kind "silu".

Forward computes every token exactly as the plain function (the same ATen op:
bitwise equal). Backward (positions [B, k], the selected tokens): grad_x
(grad_gate, grad_up) is zero at every unselected token.

Saved for backward: the selected rows of x (of gate and of up), [B * k, F]
each, shared with every other token-subset op saving rows of the same tensor
(token_rows.shared_rows); nothing of B * T rows.

dtypes: float32, float64, bfloat16 (float16 too on CUDA); gate and up share one.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward
from pypeft.ops.token_rows import add_rows_grad, fake_rows, shared_rows

_op = torch.ops.pypeft.token_subset_activation.default
_backward_op = torch.ops.pypeft.token_subset_activation_backward.default
_gated_op = torch.ops.pypeft.token_subset_gated_activation.default
_gated_backward_op = torch.ops.pypeft.token_subset_gated_activation_backward.default


def token_subset_activation(x: torch.Tensor, kind: str, positions: torch.Tensor) -> torch.Tensor:
    """act(x), differentiable at `positions` only.

    Args:
        x: [B, T, ...].
        kind: "gelu", "gelu_tanh", "silu" or "relu".
        positions: [B, k] int64, distinct token indices per batch row.
    Returns:
        y: x's shape and dtype.
    """
    return _op(x, kind, positions)[0]


def token_subset_gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str,
                                  positions: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, differentiable at `positions` only.

    Args:
        gate, up: [B, T, ...], the same shape and dtype.
        kind: "gelu", "gelu_tanh", "silu" or "relu".
        positions: [B, k] int64, distinct token indices per batch row.
    Returns:
        y: gate's shape and dtype.
    """
    return _gated_op(gate, up, kind, positions)[0]


# --- fake kernels: the checks of csrc/token_subset_activation.cpp ---------------------------

_OP, _GATED_OP = "pypeft.token_subset_activation", "pypeft.token_subset_gated_activation"
_KINDS = ("gelu", "gelu_tanh", "silu", "relu")


def _check_kind(op, kind):
    _checks.check_value(kind in _KINDS, op, "kind", "one of " + ", ".join(f"'{k}'" for k in _KINDS), f"'{kind}'")


def _check_gated_args(op, gate_arg, gate, up_arg, up, positions):
    """gate and up: the same shape, dtype and device ([B, T, ...])."""
    _checks.check_positions(op, positions, gate_arg, gate)
    _checks.check_activation_dtype(op, gate_arg, gate)
    _checks.check_shape(op, up_arg, up, tuple(gate.shape), f" (the shape of '{gate_arg}')")
    _checks.check_same_dtype(op, up_arg, up, gate_arg, gate)
    _checks.check_same_device(op, up_arg, up, gate_arg, gate)


def _check_backward_rows(op, grad_y, positions, *rows):
    _checks.check_positions(op, positions, "grad_y", grad_y)
    _checks.check_activation_dtype(op, "grad_y", grad_y)
    for name, t in rows:
        _checks.check_rows(op, name, t, positions, "grad_y", grad_y)
        _checks.check_same_dtype(op, name, t, "grad_y", grad_y)


@torch.library.register_fake("pypeft::token_subset_activation")
def _activation_fake(x, kind, positions):
    _check_kind(_OP, kind)
    _checks.check_positions(_OP, positions, "x", x)
    _checks.check_activation_dtype(_OP, "x", x)
    return torch.empty_like(x, memory_format=torch.contiguous_format), fake_rows(x, positions)


@torch.library.register_fake("pypeft::token_subset_activation_backward")
def _activation_backward_fake(grad_y, x_rows, kind, positions):
    op = _OP + "_backward"
    _check_kind(op, kind)
    _check_backward_rows(op, grad_y, positions, ("x_rows", x_rows))
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pypeft::token_subset_gated_activation")
def _gated_activation_fake(gate, up, kind, positions):
    _check_kind(_GATED_OP, kind)
    _check_gated_args(_GATED_OP, "gate", gate, "up", up, positions)
    return (torch.empty_like(gate, memory_format=torch.contiguous_format), fake_rows(gate, positions),
            fake_rows(up, positions))


@torch.library.register_fake("pypeft::token_subset_gated_activation_backward")
def _gated_activation_backward_fake(grad_y, gate_rows, up_rows, kind, positions, output_mask):
    op = _GATED_OP + "_backward"
    _check_kind(op, kind)
    _check_backward_rows(op, grad_y, positions, ("gate_rows", gate_rows), ("up_rows", up_rows))

    def grad():
        return torch.empty_like(grad_y, memory_format=torch.contiguous_format)

    need_gate, need_up = output_mask
    return grad() if need_gate else None, grad() if need_up else None


def _activation_setup_context(ctx, inputs, output):
    x, kind, positions = inputs
    _, x_rows = output
    # Unused outputs' gradients come as None, not zeros: x_rows' nearly always.
    ctx.set_materialize_grads(False)
    ctx.x_shape = tuple(x.shape)
    ctx.save_for_backward(shared_rows(x, positions, x_rows), positions)
    ctx.kind = kind


def _activation_backward(ctx, grad_y, grad_x_rows):
    x_rows, positions = ctx.saved_tensors
    grad_x = None if grad_y is None else _backward_op(grad_y, x_rows, ctx.kind, positions)
    return add_rows_grad(grad_x, grad_x_rows, positions, ctx.x_shape), None, None


def _gated_activation_setup_context(ctx, inputs, output):
    gate, up, kind, positions = inputs
    _, gate_rows, up_rows = output
    ctx.set_materialize_grads(False)
    ctx.x_shape = tuple(gate.shape)
    ctx.save_for_backward(shared_rows(gate, positions, gate_rows), shared_rows(up, positions, up_rows),
                          positions)
    ctx.kind = kind


def _gated_activation_backward(ctx, grad_y, grad_gate_rows, grad_up_rows):
    gate_rows, up_rows, positions = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_gate = grad_up = None
    if grad_y is not None:
        grad_gate, grad_up = _gated_backward_op(grad_y, gate_rows, up_rows, ctx.kind, positions,
                                                [need[0], need[1]])
    if need[0]:
        grad_gate = add_rows_grad(grad_gate, grad_gate_rows, positions, ctx.x_shape)
    if need[1]:
        grad_up = add_rows_grad(grad_up, grad_up_rows, positions, ctx.x_shape)
    return grad_gate, grad_up, None, None


torch.library.register_autograd("pypeft::token_subset_activation", _activation_backward,
                                setup_context=_activation_setup_context)
torch.library.register_autograd("pypeft::token_subset_gated_activation", _gated_activation_backward,
                                setup_context=_gated_activation_setup_context)

forbid_double_backward("pypeft::token_subset_activation_backward", "pypeft.token_subset_activation")
forbid_double_backward("pypeft::token_subset_gated_activation_backward",
                       "pypeft.token_subset_gated_activation")
