"""Sharing the saved rows of the selected tokens between token-subset ops.

Every token-subset op returns the selected rows of its input (x_rows) and its
autograd layer saves them. Several ops often read the same x (a layer's query,
key and value projections; LoRA layers on them), and saving one gathered copy
per op would triple what TokenTune keeps. `shared_rows` hands every op reading
the same x (same tensor object, same version, same positions) the first op's
copy, so autograd holds one.

Only in eager mode: under torch.compile the graph is traced once and the
compiler plans saved tensors itself (there each op keeps its own copy).

The rows are a real (differentiable) output, a gather of x: `add_rows_grad`
sends a gradient that reaches them to x, and their being differentiable is
what makes a backward of the backward op fail loudly, as every pypeft op does
(_double_backward.py). `fake_rows` is their shape for register_fake.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks

_ATTR = "_pypeft_token_rows"


def shared_rows(x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, tag: str = "") -> torch.Tensor:
    """The rows to save for x: an earlier op's copy if it gathered the same
    rows of this x (same tag: ops that save different things of x use
    different tags), otherwise `rows`, remembered on x for the next op."""
    if torch.compiler.is_compiling():
        return rows
    cached = getattr(x, _ATTR, None)
    key = (tag, positions, x._version)
    if cached is not None:
        for k, saved in cached:
            if k[0] == tag and k[1] is positions and k[2] == x._version and saved.shape == rows.shape:
                return saved
    else:
        cached = []
        setattr(x, _ATTR, cached)
    cached.append((key, rows))
    return rows


def fake_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """For register_fake: the [B * k, F] rows a token-subset op gathers from x
    ([B, T, ...], F the product of its dims after the first two)."""
    return x.new_empty((positions.shape[0] * positions.shape[1], _checks.row_features(x)))


def add_rows_grad(grad_x: torch.Tensor | None, grad_rows: torch.Tensor | None, positions: torch.Tensor,
                  shape) -> torch.Tensor | None:
    """grad_x (or zeros of x's `shape` when None) plus grad_rows ([B * k, F],
    the gradient that reached an op's rows output) at the selected tokens.
    Ops set ctx.set_materialize_grads(False), so grad_rows is None, and this
    costs nothing, unless someone used the rows."""
    if grad_rows is None:
        return grad_x
    batch, tokens = positions.shape[0], shape[1]
    flat = (positions + torch.arange(batch, device=positions.device).unsqueeze(1) * tokens).reshape(-1)
    if grad_x is None:
        grad_x = grad_rows.new_zeros(shape)
    return grad_x.reshape(batch * tokens, grad_rows.shape[1]).index_add(0, flat, grad_rows).view(shape)
