"""What the token-subset op tests share: shapes and positions to try, running
an op and its reference to compare outputs and gradients, what autograd
saved, and the positions every op must reject."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

# (B, T, k): one token, a middle k, every token; one batch row and several.
SHAPES = [(1, 6, 1), (1, 6, 3), (1, 5, 5), (3, 7, 1), (3, 7, 4), (2, 5, 5)]
SHAPE_IDS = [f"B{b}-T{t}-k{k}" for b, t, k in SHAPES]


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


def saved_tensors(fn, *args):
    """The tensors autograd saves while fn(*args) runs, and fn's result."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*args)
    return saved, out


def assert_no_full_rows(saved, batch: int, tokens: int):
    """No saved tensor holds a row per token of all B * T."""
    for t in saved:
        assert not (t.dim() >= 1 and t.shape[0] == batch * tokens), tuple(t.shape)
        assert not (t.dim() >= 2 and tuple(t.shape[:2]) == (batch, tokens)), tuple(t.shape)


# Positions every forward op rejects, for x with B = 2, T = 5: (positions,
# exception, words the message holds).
BAD_POSITIONS = {
    "float dtype": (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), TypeError, "int64"),
    "wrong batch": (torch.tensor([[0, 1], [2, 3], [1, 4]]), ValueError, "[B, k] with B = 2"),
    "1-D": (torch.tensor([0, 1]), ValueError, "2-D"),
    "out of range": (torch.tensor([[0, 5], [1, 2]]), ValueError, "[0, 5)"),
    "negative": (torch.tensor([[0, -1], [1, 2]]), ValueError, "[0, 5)"),
    "duplicate in a row": (torch.tensor([[3, 1], [2, 2]]), ValueError, "distinct"),
    "more than T": (torch.tensor([[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 0]]), ValueError, "at most 5"),
}


def check_bad_positions(call, case):
    """call(positions) must raise the case's error naming 'positions'."""
    bad, exc, words = BAD_POSITIONS[case]
    with pytest.raises(exc) as info:
        call(bad)
    msg = str(info.value)
    assert "'positions'" in msg and "expected" in msg and words in msg, msg


def on_selected_tokens(fn, positions, *bases):
    """For gradcheck: a function of the selected tokens' values only.

    It takes one [B, k, ...] tensor per base ([B, T, ...], held constant),
    places them at `positions` in copies of the bases, runs fn on those (and
    on any further arguments) and returns fn's output at the selected tokens.
    Its Jacobian is exactly what a token-subset op's backward computes; the
    op's own forward depends on unselected tokens too, so plain gradcheck of
    it would (rightly) disagree. Returns the function and the starting values.
    """
    b = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)

    def f(*args):
        full = [base.index_put((b, positions), s) for base, s in zip(bases, args[:len(bases)])]
        return fn(*full, *args[len(bases):])[b, positions]

    return f, [base[b, positions].detach().clone() for base in bases]


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


def assert_compiled_matches_eager(step, leaves_, *constants, backend: str):
    """torch.compile(step, fullgraph=True) gives eager's loss and gradients
    w.r.t. `leaves_` (step(*leaves_, *constants) -> scalar loss)."""
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    loss, want = compiled(*leaves_, *constants), step(*leaves_, *constants)
    torch.testing.assert_close(loss, want)
    for a, b in zip(torch.autograd.grad(loss, leaves_), torch.autograd.grad(want, leaves_)):
        torch.testing.assert_close(a, b)
