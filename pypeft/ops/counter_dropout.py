"""pypeft::counter_dropout: the dropout mask every pypeft op uses, on its own.

Element (row, col) of x viewed as [rows, C] (C = last dim) is kept when a
counter hash of (seed, row_ids[row] or row, col) clears the threshold, and
scaled by 1 / (1 - p). Being a pure function of indices, the mask is
regenerated in backward instead of stored, and a subset of rows gathered out
of a larger tensor (with their row ids) is masked exactly as it was there.

dtypes: float32, float64, bfloat16 (float16 too on CUDA); the output has x's.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks

_op = torch.ops.pypeft.counter_dropout.default
_OP = "pypeft.counter_dropout"


def counter_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None,
                    row_ids: torch.Tensor | None = None) -> torch.Tensor:
    """drop(x) with the mask of (seed, row id, column).

    Args:
        x: [..., C] tensor; rows are its leading dims flattened.
        p: dropout probability in [0, 1).
        seed: 0-dim int64 tensor (needed when p > 0).
        row_ids: int64 tensor with one id per row, or None for 0, 1, 2, ...
    """
    return _op(x, p, seed, row_ids)


@torch.library.register_fake("pypeft::counter_dropout")
def _counter_dropout_fake(x, p, seed, row_ids):
    # As csrc/include/pypeft/counter_dropout.h: x viewed as [rows, C].
    _checks.check_defined(_OP, "x", x)
    _checks.check_activation_dtype(_OP, "x", x)
    _checks.check_probability(_OP, "p", p)
    _checks.check_seed(_OP, "seed", seed, p > 0.0, x)
    cols = 1 if x.dim() == 0 else x.shape[-1]
    rows = 0 if cols == 0 else x.numel() // cols
    _checks.check_row_ids(_OP, row_ids, x, rows)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, p, seed, row_ids = inputs
    ctx.save_for_backward(seed, row_ids)
    ctx.p = p


def _backward(ctx, grad):
    seed, row_ids = ctx.saved_tensors
    # The mask is linear and symmetric: its gradient is the same mask.
    return _op(grad, ctx.p, seed, row_ids), None, None, None


torch.library.register_autograd("pypeft::counter_dropout", _backward, setup_context=_setup_context)
