"""What the token-subset op tests share (beyond the op contract of
tests/op_table.py): random shapes and positions, running an op and its
reference to compare outputs and gradients, a check of what autograd saved
(recorded with tests/saved_tensors.py) and of the rows outputs' gradients."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def token_shapes(draw):
    """(B, T, k, positions seed) for hypothesis: empty batches and k = 0 included."""
    tokens = draw(st.integers(1, 7))
    return draw(st.integers(0, 3)), tokens, draw(st.integers(0, tokens)), draw(st.integers(0, 1000))


def positions(batch: int, tokens: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """[batch, k] distinct token indices per row, in random (unsorted) order."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(tokens, generator=g)[:k] for _ in range(batch)]
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)).to(device)


def randn(*shape, dtype=torch.float64, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def outputs_and_grads(fn, tensors, grad_seed: int = 1):
    """fn(*tensors) and the gradients of <fn(...), g> (g random) for every
    tensor that requires grad (None where none reaches it)."""
    y = fn(*tensors)
    g = randn(*y.shape, dtype=y.dtype, device=y.device, seed=grad_seed)
    wrt = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wrt, g, allow_unused=True)
    return y, list(grads)


def leaves(tensors, dtype=None):
    """Fresh leaves (cast to dtype when given) that require grad; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True)
            for t in tensors]


def assert_matches(ours, reference, tensors, atol=1e-10, rtol=1e-10, atol_of_max=0.0):
    """ours(*tensors) against reference(*tensors): the output and every
    gradient, each in its input's dtype and shape. atol_of_max: an absolute
    tolerance of that share of the largest reference value (low precision)."""
    mine, theirs = leaves(tensors), leaves(tensors, torch.float64)
    y, grads = outputs_and_grads(ours, mine)
    y_ref, grads_ref = outputs_and_grads(reference, theirs)

    def close(a, b, what):
        tol = max(atol, atol_of_max * b.abs().max().item()) if b.numel() else atol
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=rtol, msg=lambda m: f"{what}: {m}")

    close(y, y_ref, "y")
    for i, (t, a, b) in enumerate(zip([t for t in mine if t is not None], grads, grads_ref)):
        b = torch.zeros_like(t, dtype=torch.float64) if b is None else b
        assert a is not None and a.dtype == t.dtype and a.shape == t.shape, f"grad {i}"
        close(a, b, f"grad {i}")


def assert_no_full_rows(saved, batch: int, tokens: int):
    """No saved tensor holds a row per token of all B * T."""
    for t in saved:
        assert not (t.dim() >= 1 and t.shape[0] == batch * tokens), tuple(t.shape)
        assert not (t.dim() >= 2 and tuple(t.shape[:2]) == (batch, tokens)), tuple(t.shape)


def assert_rows_output_differentiable(call, x, positions, which=1):
    """call(x) returns (y, rows...): a gradient that reaches out[which] (the
    [B * k, F] selected rows of x) must reach x at the selected tokens, and
    add to y's there."""
    B, k = positions.shape
    b = torch.arange(B).unsqueeze(1).expand_as(positions)
    x = x.detach().clone().requires_grad_(True)
    out = call(x)
    c = randn(*out[which].shape, dtype=x.dtype, seed=3)
    (g,) = torch.autograd.grad((out[which] * c).sum(), x)
    want = torch.zeros_like(x)
    want[b, positions] = c.view(B, k, *x.shape[2:])
    torch.testing.assert_close(g, want, atol=0, rtol=0)
    out = call(x)
    (g_both,) = torch.autograd.grad((out[0].sum(), (out[which] * c).sum()), x)
    (g_y,) = torch.autograd.grad(call(x)[0].sum(), x)
    torch.testing.assert_close(g_both, g_y + want)
