"""pypeft::token_subset_dropout: TokenTune's dropout on x ([B, T, ...]).

Forward is counter_dropout of x viewed as [B * T, F] (F the product of x's
dims after the first two): element (b, t, f) is kept when a counter hash of
(seed, b * T + t, f) clears p, and kept elements are scaled by 1 / (1 - p).
Backward (positions [B, k], the selected tokens) regenerates that mask for the
selected rows only; grad_x is zero at every unselected token. With p = 0 it is
the identity (a copy) whose gradient keeps only the selected tokens: where a
token-subset region of a model begins.

Saved for backward: the seed and the positions, nothing else.

dtypes: float32, float64, bfloat16 (float16 too on CUDA); y has x's.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.token_subset_dropout.default
_backward_op = torch.ops.pypeft.token_subset_dropout_backward.default


def token_subset_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None,
                         positions: torch.Tensor) -> torch.Tensor:
    """drop(x), differentiable at `positions` only.

    Args:
        x: [B, T, ...].
        p: dropout probability in [0, 1).
        seed: 0-dim int64 tensor choosing the mask (needed when p > 0); a
            tensor, so torch.compile does not recompile as it changes every step.
        positions: [B, k] int64, distinct token indices per batch row.
    Returns:
        y: x's shape and dtype.
    """
    return _op(x, p, seed, positions)


_OP = "pypeft.token_subset_dropout"


def _check_args(op, x_arg, x, p, seed, positions):
    """The checks of csrc/token_subset_dropout.cpp (positions' values aside)."""
    _checks.check_positions(op, positions, x_arg, x)
    _checks.check_activation_dtype(op, x_arg, x)
    _checks.check_probability(op, "p", p)
    _checks.check_seed(op, "seed", seed, p > 0.0, x)


@torch.library.register_fake("pypeft::token_subset_dropout")
def _dropout_fake(x, p, seed, positions):
    _check_args(_OP, "x", x, p, seed, positions)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pypeft::token_subset_dropout_backward")
def _dropout_backward_fake(grad_y, p, seed, positions):
    _check_args(_OP + "_backward", "grad_y", grad_y, p, seed, positions)
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, p, seed, positions = inputs
    ctx.save_for_backward(seed, positions)
    ctx.p = p


def _backward(ctx, grad_y):
    seed, positions = ctx.saved_tensors
    return _backward_op(grad_y, ctx.p, seed, positions), None, None, None


torch.library.register_autograd("pypeft::token_subset_dropout", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::token_subset_dropout_backward", "pypeft.token_subset_dropout")
