"""pypeft::rnn_cell, gru_cell, lstm_cell: one step of a recurrent cell, as
torch.nn.RNNCell (tanh), GRUCell and LSTMCell with the same weights.

With G gates (rnn 1; gru 3, order r, z, n; lstm 4, order i, f, g, o) and
hidden size H:

    x [N, in], h, c [N, H], w_ih [G·H, in], w_hh [G·H, H], b_ih, b_hh [G·H] or None
    rnn:  h' = tanh(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)
    gru:  n = tanh(gi_n + r ⊙ (W_hn h + b_hn)),  h' = (1 - z) ⊙ n + z ⊙ h
    lstm: c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')

Two GEMMs and one fused elementwise kernel per step (CPU and CUDA). Saved for
backward: the inputs and weights only (backward recomputes the gates). All
tensors share one dtype: float32, float64, bfloat16 (float16 too on CUDA);
bfloat16 / float16 do the gate math in float. For a whole sequence, use
pypeft.ops.recurrent_scan (one op, one input GEMM for every step).
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward

_rnn_op = torch.ops.pypeft.rnn_cell.default
_gru_op = torch.ops.pypeft.gru_cell.default
_lstm_op = torch.ops.pypeft.lstm_cell.default
_backward_op = torch.ops.pypeft.recurrent_cell_backward.default


def rnn_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """h' = tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh), as torch.nn.RNNCell."""
    return _rnn_op(x, h, w_ih, w_hh, b_ih, b_hh)


def gru_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """h', as torch.nn.GRUCell (w_ih [3H, in], w_hh [3H, H], gate order r, z, n)."""
    return _gru_op(x, h, w_ih, w_hh, b_ih, b_hh)


def lstm_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None = None,
              b_hh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', c'), as torch.nn.LSTMCell (w_ih [4H, in], w_hh [4H, H], gate order i, f, g, o)."""
    return _lstm_op(x, h, c, w_ih, w_hh, b_ih, b_hh)


# --- fake kernels: the checks of csrc/include/pypeft/recurrent.h -----------------------------

def _cell_fake(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    rows, hidden = _checks.check_recurrent_args(f"pypeft.{cell}_cell", cell, False, x, h, c, w_ih, w_hh, b_ih, b_hh)
    return x.new_empty((rows, hidden))


@torch.library.register_fake("pypeft::rnn_cell")
def _rnn_cell_fake(x, h, w_ih, w_hh, b_ih, b_hh):
    return _cell_fake("rnn", x, h, None, w_ih, w_hh, b_ih, b_hh)


@torch.library.register_fake("pypeft::gru_cell")
def _gru_cell_fake(x, h, w_ih, w_hh, b_ih, b_hh):
    return _cell_fake("gru", x, h, None, w_ih, w_hh, b_ih, b_hh)


@torch.library.register_fake("pypeft::lstm_cell")
def _lstm_cell_fake(x, h, c, w_ih, w_hh, b_ih, b_hh):
    h_out = _cell_fake("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh)
    return h_out, torch.empty_like(h_out)


def _grad_like(t, needed):
    return torch.empty_like(t, memory_format=torch.contiguous_format) if needed and t is not None else None


@torch.library.register_fake("pypeft::recurrent_cell_backward")
def _recurrent_cell_backward_fake(grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih, b_hh, cell, output_mask):
    op = "pypeft.recurrent_cell_backward"
    _checks.check_cell(op, cell)
    rows, hidden = _checks.check_recurrent_args(op, cell, False, x, h, c, w_ih, w_hh, b_ih, b_hh)
    _checks.check_state(op, "grad_h", grad_h, rows, hidden, "x", x)
    if grad_c is not None:
        _checks.check_value(cell == "lstm", op, "grad_c", f"None for cell '{cell}'", "a tensor")
        _checks.check_state(op, "grad_c", grad_c, rows, hidden, "x", x)
    return tuple(_grad_like(t, need) for t, need in zip((x, h, c, w_ih, w_hh, b_ih, b_hh), output_mask))


# One autograd formula for the three cells: inputs in the order
# (x, h, [c,] w_ih, w_hh, b_ih, b_hh); c only for lstm.

def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(cell: str):
    has_c = cell == "lstm"

    def backward(ctx, grad_h, grad_c=None):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        if has_c:
            x, h, c, w_ih, w_hh, b_ih, b_hh = saved
            mask = list(need)
        else:
            (x, h, w_ih, w_hh, b_ih, b_hh), c = saved, None
            mask = [need[0], need[1], False, *need[2:]]
        grads = _backward_op(grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih, b_hh, cell, mask)
        return grads if has_c else (grads[0], grads[1], *grads[3:])

    return backward


for _cell in ("rnn", "gru", "lstm"):
    torch.library.register_autograd(f"pypeft::{_cell}_cell", _make_backward(_cell), setup_context=_setup_context)

forbid_double_backward("pypeft::recurrent_cell_backward", "pypeft.rnn_cell / gru_cell / lstm_cell")
