"""Keeping an op's input for backward without keeping a second copy of it.

An adapter op needs its input x in backward. Often x is the output of a cheap
elementwise op whose own backward already keeps that op's inputs (GELU keeps
its input; a product a * b keeps a and b). Saving those tensors instead of x
costs no extra memory (autograd holds them anyway) and x is recomputed, bit for
bit, when backward runs. Otherwise x is saved itself, compacted first if it is
a small view of a much larger storage.

Used in register_autograd's setup_context, i.e. outside torch.compile, which
plans saved activations itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy when t views a much larger storage: saving the view would
    keep the whole storage alive (BERT's pooler reads the first token of each
    sequence out of the last hidden state)."""
    if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size():
        return t.contiguous()
    return t


def _producer_inputs(x: torch.Tensor):
    """(recipe, tensors) rebuilding x from tensors its producer saved, or None."""
    fn = x.grad_fn
    name = type(fn).__name__ if fn is not None else ""
    try:
        if name == "GeluBackward0":
            h = fn._saved_self
            if h.shape == x.shape and h.dtype == x.dtype:
                return f"gelu:{fn._saved_approximate}", (h,)
        elif name == "MulBackward0":
            a, b = fn._saved_self, fn._saved_other
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and torch.broadcast_shapes(a.shape, b.shape) == x.shape
                    and torch.result_type(a, b) == x.dtype):
                return "mul", (a, b)
    except (RuntimeError, AttributeError):  # saved tensors already freed, or another layout
        return None
    return None


def plan(x: torch.Tensor) -> tuple[str | None, tuple[torch.Tensor, ...]]:
    """What to save for x: (recipe, tensors); recipe None means tensors == (x,)."""
    if not torch.compiler.is_compiling():
        found = _producer_inputs(x)
        if found is not None:
            return found
        return None, (_compact(x),)
    return None, (x,)


def rebuild(recipe: str | None, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if recipe is None:
        return tensors[0]
    if recipe.startswith("gelu:"):
        return F.gelu(tensors[0], approximate=recipe.split(":", 1)[1])
    if recipe == "mul":
        return tensors[0] * tensors[1]
    raise AssertionError(f"unknown recipe {recipe!r}")
