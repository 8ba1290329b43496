"""TokenTune under activation checkpointing (transformers'
gradient_checkpointing / activation_checkpointing).

A checkpointed layer runs its forward again during backward, to recompute
what it did not keep. By then the model's forward has returned and the
selection is cleared (and backward may run in another thread, which sees no
per-thread selection at all), so the recomputation would run the layer on
all tokens: other saved tensors than the first forward's (torch raises "A
different number of tensors was saved"), or, with as many, gradients of
other tokens. So every checkpointing function transformers puts on the
model's layers (`_gradient_checkpointing_func`, set when checkpointing is
enabled, possibly after patching) is wrapped, before each forward of the
model, with one that records the selection in force when the layer runs and
puts exactly that back while the layer's function runs, the first time and
when recomputed. It works the same for reentrant and non-reentrant
checkpointing, since it wraps the function checkpointed rather than the
checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

FUNC_ATTR = "_gradient_checkpointing_func"  # where transformers keeps a layer's checkpointing function


class SelectionReplay:
    """A checkpointing function that replays the token selection in force at
    the call in every run of the checkpointed function."""

    def __init__(self, inner, selection):
        self.inner = inner
        self.selection = selection

    def __call__(self, function, *args, **kwargs):
        snapshot = self.selection.snapshot()

        def run(*a, **kw):
            with self.selection.replaying(snapshot):
                return function(*a, **kw)

        return self.inner(run, *args, **kwargs)


class CheckpointReplay:
    """Keeps the model's checkpointing functions wrapped (a forward pre-hook
    on the model) and unwraps them on detach."""

    def __init__(self, model: nn.Module, selection):
        self.selection = selection
        # The modules transformers may give a checkpointing function: those with the flag.
        self.candidates = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def before_forward(self, *unused):
        if torch.compiler.is_compiling():  # attributes are set outside traced code only
            return
        for module in self.candidates:
            func = module.__dict__.get(FUNC_ATTR)
            if func is not None and not isinstance(func, SelectionReplay):
                module.__dict__[FUNC_ATTR] = SelectionReplay(func, self.selection)

    def remove(self) -> None:
        for module in self.candidates:
            func = module.__dict__.get(FUNC_ATTR)
            if isinstance(func, SelectionReplay):
                module.__dict__[FUNC_ATTR] = func.inner
