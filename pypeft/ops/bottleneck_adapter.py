"""pypeft::bottleneck_adapter: a bottleneck adapter block (Houlsby / Pfeiffer /
parallel) in one op, the `adapters` library's Adapter:

    out = residual + dropout(scale * (act(z @ w_down.T + b_down) @ w_up.T + b_up))

Its dropout sits on the scaled up-projection (the d-wide output), not on the
input, and the scaling multiplies b_up too, as in `adapters`.

Saved for backward: z (or, where z is the output of a GELU or a product whose
inputs autograd keeps anyway, those instead; see saved_inputs.py) and the
bottleneck pre-activation p = z @ w_down.T + b_down ([..., m]): nothing else
of z's size. Backward recomputes act(p) and regenerates the dropout mask, a
counter hash of (seed, row, column) over the output viewed as [N, d],
identical on CPU and CUDA for the same seed.

dtypes: z and residual share one dtype: float32, float64 or bfloat16 (float16
too on CUDA). w_down, b_down, w_up and b_up share one dtype: z's, or float32
when z is bfloat16/float16 (fp32 adapter weights beside low-precision
activations); the products then run in z's dtype and the weights' gradients
come back in float32. Any other mix raises a TypeError naming the argument.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks, saved_inputs
from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.bottleneck_adapter.default
_backward_op = torch.ops.pypeft.bottleneck_adapter_backward.default
_OP, _BACKWARD_OP = "pypeft.bottleneck_adapter", "pypeft.bottleneck_adapter_backward"

ACTIVATIONS = _checks.ADAPTER_ACTIVATIONS


def bottleneck_adapter(
    z: torch.Tensor,
    residual: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scale: float,
    activation: str,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + dropout(scale * (act(z @ w_down.T + b_down) @ w_up.T + b_up)).

    Args:
        z: [..., d] the adapter's input.
        residual: [..., d], z's shape and dtype, or None (zero).
        w_down: [m, d]; b_down: [m] or None.
        w_up: [d, m]; b_up: [d] or None.
        scale: the adapter's scaling (multiplies b_up too).
        activation: one of "relu", "silu", "gelu" (erf), "gelu_tanh", "tanh",
            "sigmoid", "leaky_relu" (negative slope 0.01), "identity".
        dropout_p: dropout probability on the scaled up-projection, in [0, 1).
        seed: 0-dim int64 tensor choosing the dropout mask (needed when
            dropout_p > 0); a tensor, so torch.compile does not recompile as it
            changes every step.
    Returns:
        out: [..., d], contiguous.
    """
    return _op(z, residual, w_down, b_down, w_up, b_up, scale, activation, dropout_p, seed)[0]


@torch.library.register_fake("pypeft::bottleneck_adapter")
def _bottleneck_adapter_fake(z, residual, w_down, b_down, w_up, b_up, scale, activation, dropout_p, seed):
    _checks.check_bottleneck_adapter_args(_OP, z, residual, w_down, b_down, w_up, b_up, scale, activation,
                                          dropout_p, seed)
    out = z.new_empty(z.shape)
    p = z.new_empty((*z.shape[:-1], w_down.shape[0]))
    return out, p


@torch.library.register_fake("pypeft::bottleneck_adapter_backward")
def _bottleneck_adapter_backward_fake(grad_out, grad_p, z, p, w_down, w_up, scale, activation, dropout_p, seed,
                                      output_mask):
    _checks.check_bottleneck_adapter_backward_args(_BACKWARD_OP, grad_out, grad_p, z, p, w_down, w_up, scale,
                                                   activation, dropout_p, seed)
    need_z, need_w_down, need_b_down, need_w_up, need_b_up = output_mask
    return (
        z.new_empty(z.shape) if need_z else None,
        w_down.new_empty(w_down.shape) if need_w_down else None,
        w_down.new_empty((w_down.shape[0],)) if need_b_down else None,
        w_up.new_empty(w_up.shape) if need_w_up else None,
        w_up.new_empty((w_up.shape[0],)) if need_b_up else None,
    )


def _setup_context(ctx, inputs, output):
    z, residual, w_down, b_down, w_up, b_up, scale, activation, dropout_p, seed = inputs
    _, p = output
    ctx.z_recipe, z_saved = saved_inputs.plan(z)
    ctx.save_for_backward(w_down, w_up, p, seed, *z_saved)
    ctx.scale, ctx.activation, ctx.dropout_p = scale, activation, dropout_p


def _backward(ctx, grad_out, grad_p):
    need = ctx.needs_input_grad
    # out = residual + ...: residual's gradient is grad_out itself (same shape, no broadcast).
    grad_residual = grad_out if need[1] else None
    mask = [need[0], need[2], need[3], need[4], need[5]]
    if not any(mask):  # only the residual trains: nothing of the adapter to differentiate
        return None, grad_residual, None, None, None, None, None, None, None, None
    w_down, w_up, p, seed, *z_saved = ctx.saved_tensors
    z = saved_inputs.rebuild(ctx.z_recipe, tuple(z_saved))
    grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up = _backward_op(
        grad_out, grad_p, z, p, w_down, w_up, ctx.scale, ctx.activation, ctx.dropout_p, seed, mask)
    return grad_z, grad_residual, grad_w_down, grad_b_down, grad_w_up, grad_b_up, None, None, None, None


torch.library.register_autograd("pypeft::bottleneck_adapter", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::bottleneck_adapter_backward", "pypeft.bottleneck_adapter")
