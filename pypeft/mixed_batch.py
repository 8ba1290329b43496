"""pypeft.mixed_batch(): serve many adapters at once, each batch row with its own.

    with pypeft.mixed_batch(model, ["alice", "bob", "base", "alice"]):
        logits = model(**batch).logits

Each adapted layer runs its rows in one native op call (pypeft::lora_linear_mixed,
pypeft::vera_linear_mixed), not a Python loop over adapters. Soft-prompt
methods read the same assignment: prompt / P-tuning rows get their own virtual
tokens in front (pypeft/methods/prompt/rewrite.py), prefix-tuning rows their
own prefix keys and values (pypeft/methods/prefix/attention.py); rows with
fewer virtual slots get masked ones. Inference only, as
peft's `adapter_names=`: the model must be in eval mode. The row assignment is
per thread (the model's ForwardContext): serving threads sharing one model
each run their own batch.
"""

from __future__ import annotations

import contextlib

from torch import nn

from pypeft.layer import BASE
from pypeft.state import merged_out, require_state


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names):
    """Run row i of every batch in the block with adapter `adapter_names[i]`
    ("base": no adapter), in this thread. Rows equal running each alone with
    its adapter active. Merged adapters are taken out for the block and put
    back. Blocks nest; each restores the assignment it found."""
    state = require_state(model, "mixed_batch")
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError("pypeft.mixed_batch: argument 'adapter_names': expected a list of adapter names, one "
                         f"per batch row, got {adapter_names!r}")
    names = list(adapter_names)
    known = sorted(state.adapters)
    for name in names:
        if name != BASE and name not in state.adapters:
            raise ValueError(f"pypeft.mixed_batch: argument 'adapter_names': unknown adapter {name!r}; "
                             f"expected one of {known} or {BASE!r}")
    if model.training:
        raise ValueError("pypeft.mixed_batch: mixed-adapter batches are for inference (as peft's adapter_names); "
                         "call model.eval() first")
    context = state.context
    with merged_out(model, state):
        before = context.mixed_rows
        context.mixed_rows = names
        try:
            yield model
        finally:
            context.mixed_rows = before
