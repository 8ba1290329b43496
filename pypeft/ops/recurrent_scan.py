"""pypeft::recurrent_scan: a recurrent cell (rnn, gru, lstm; see
pypeft.ops.recurrent_cell) run over a sequence, for READ, where the sequence
is a frozen backbone's layer index and every token position is its own row.

    xs [L, N, in], h0 (c0: lstm only) [N, H]  ->  hs [L, N, H]
    hs[t] = cell(xs[t], hs[t-1]),  hs[-1] = h0   (any L >= 0, N >= 0)

Forward: one GEMM projects every step's input (xs W_ihᵀ + b_ih), then per
step one GEMM (h W_hhᵀ + b_hh) and one fused elementwise gate kernel that
writes hs[t]. Saved for backward: xs, hs, h0, c0 and the weights, nothing of
size L·N·G·H (LSTM cell states are recomputed). Backward recomputes both
projections in one GEMM each, walks the steps in reverse with one gate kernel
and one GEMM per step, and runs only on the rows whose gradient is nonzero
somewhere (a classifier reading one token per sequence sends gradient to B of
B·T rows); the others' grad_xs / grad_h0 / grad_c0 are zero.

dtypes: float32, float64, bfloat16 (float16 too on CUDA), one for every
tensor; bfloat16 / float16 do the gate math in float.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.recurrent_scan.default
_backward_op = torch.ops.pypeft.recurrent_scan_backward.default


def recurrent_scan(xs: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                   b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None, cell: str = "gru",
                   c0: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden state after every step of `cell` over xs.

    Args:
        xs: [L, N, in], the inputs of the L steps.
        h0: [N, H], the state before the first step.
        w_ih, w_hh: [G·H, in], [G·H, H] (G = 1, 3, 4 for "rnn", "gru", "lstm"),
            as torch.nn.RNNCell / GRUCell / LSTMCell's weight_ih / weight_hh.
        b_ih, b_hh: [G·H] or None.
        cell: "rnn" (tanh), "gru" or "lstm".
        c0: [N, H], the LSTM cell state before the first step (lstm only, required there).
    Returns:
        hs: [L, N, H].
    """
    return _op(xs, h0, c0, w_ih, w_hh, b_ih, b_hh, cell)


# --- fake kernels: the checks of csrc/include/pypeft/recurrent.h -----------------------------

_OP, _BACKWARD_OP = "pypeft.recurrent_scan", "pypeft.recurrent_scan_backward"


@torch.library.register_fake("pypeft::recurrent_scan")
def _recurrent_scan_fake(xs, h0, c0, w_ih, w_hh, b_ih, b_hh, cell):
    _checks.check_cell(_OP, cell)
    rows, hidden = _checks.check_recurrent_args(_OP, cell, True, xs, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return xs.new_empty((xs.shape[0], rows, hidden))


@torch.library.register_fake("pypeft::recurrent_scan_backward")
def _recurrent_scan_backward_fake(grad_hs, xs, hs, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, output_mask):
    op = _BACKWARD_OP
    _checks.check_cell(op, cell)
    rows, hidden = _checks.check_recurrent_args(op, cell, True, xs, h0, c0, w_ih, w_hh, b_ih, b_hh)
    want = (xs.shape[0], rows, hidden)
    for name, t in (("grad_hs", grad_hs), ("hs", hs)):
        _checks.check_shape(op, name, t, want, " ([L, N, H] from 'xs' and w_hh)")
        _checks.check_like(op, name, t, "xs", xs)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else None
                 for t, need in zip((xs, h0, c0, w_ih, w_hh, b_ih, b_hh), output_mask))


def _setup_context(ctx, inputs, output):
    xs, h0, c0, w_ih, w_hh, b_ih, b_hh, cell = inputs
    ctx.cell = cell
    ctx.save_for_backward(xs, output, h0, c0, w_ih, w_hh, b_ih, b_hh)


def _backward(ctx, grad_hs):
    xs, hs, h0, c0, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
    grads = _backward_op(grad_hs, xs, hs, h0, c0, w_ih, w_hh, b_ih, b_hh, ctx.cell, list(ctx.needs_input_grad[:7]))
    return (*grads, None)


torch.library.register_autograd("pypeft::recurrent_scan", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::recurrent_scan_backward", "pypeft.recurrent_scan")
