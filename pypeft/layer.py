"""What every module pypeft puts into a model has in common (PypeftLayer),
and the per-thread settings its forward reads (ForwardContext).

patch() finds its modules by this base class, whatever method made them:
LoRA/VeRA linear layers, the trainable copies of modules_to_save, READ's side
networks, and a method someone registers from outside the package. A layer
holds named adapters, one (or none) of them active; the lifecycle calls
below are what patch(), set_adapter(), delete_adapter(), merge() and
unpatch() need of it.

Forward-time switches (pypeft.disabled, pypeft.mixed_batch) are per thread:
they live in the model's ForwardContext, a threading.local, so a serving
thread running a mixed batch does not change what another thread's forward
computes. torch.compile traces reads of it (and guards on them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn

BASE = "base"  # the row name, in a mixed batch, of rows that run without an adapter
CONTEXT_ATTR = "_pypeft_context"
# Where a method that restricts backward to some tokens (TokenTune) puts, on a
# module, the object whose positions_for(x, token_dim=1) gives the selected
# positions of x (None: run the module as usual). The seam between such a
# method and the layers that run token-subset ops themselves.
TOKENS_ATTR = "_pypeft_tokens"
# Where a method that puts virtual tokens into the model's call (prompt
# tuning, P-tuning: its forward pre-hook rewrites input_ids into
# inputs_embeds with the prompts in front) puts, on the top-level model, an
# object whose virtual_slots() gives the call in flight in this thread a
# VirtualSlots (None: the call has none). A token-restricting method
# (TokenTune) reads it to select those slots always: the prompts are what
# trains. The rewriting pre-hook runs before every other pre-hook on the
# model (registered with prepend=True), so those see the rewritten call.
VIRTUAL_TOKENS_ATTR = "_pypeft_virtual_tokens"


class PerThread(threading.local):
    """Attributes each thread sees on its own. A copy of the model (deepcopy,
    pickle) gets fresh ones: what one thread was doing is not state."""

    def __reduce__(self):
        return (type(self), ())


@dataclass(frozen=True)
class VirtualSlots:
    """The slots a call rewriting put into the sequence (VIRTUAL_TOKENS_ATTR)."""

    # [batch, length] bool, True on the slots that are no token of the call:
    # each row's virtual tokens and, where rows have fewer than others (mixed
    # batches), the masked pad slots that line them up; as many per row.
    slots: torch.Tensor
    # [batch, length - slots per row]: the call's own token ids, in order
    # (None: it gave inputs_embeds).
    input_ids: torch.Tensor | None
    # Whether a head reads the sequence's last position (last-token
    # classifiers: the rewriting puts each row's last real token's hidden
    # state there, a pad's position under right padding): it is then always
    # selected too.
    end: bool = False


class ForwardContext(PerThread):
    """One per patched model, shared by all its pypeft layers."""

    def __init__(self):
        self.disabled = False              # pypeft.disabled(): the base model
        self.mixed_rows: list[str] | None = None  # pypeft.mixed_batch(): an adapter name per batch row


class PypeftLayer(nn.Module):
    """Base class of the modules pypeft puts into a model.

    Subclasses implement adapter_names(), activate(), delete_adapter(); a
    layer whose adapters fold into base weights overrides merge()/unmerge().

    A layer that `stands_for_base` computes what its `base_layer` computes
    with some of that module's parameters replaced (BitFit's biases): code
    that asks what kind of module sits somewhere (is it linear? its weight?
    its bias?) reads it as its base (pypeft.layer.underlying), so another
    method can wrap it as it would wrap the base itself. Its `bias` and
    `weight` are the ones its forward uses.

    A layer `outside_sequence` computes nothing per token of the input
    (prefix tuning's encoders, whose output is keys and values of their own;
    prompt tuning's prompt embeddings and P-tuning's encoders, whose output
    the call rewriting puts in front of the tokens):
    TokenTune leaves it, and the modules it holds, as they are."""

    stands_for_base: ClassVar[bool] = False
    outside_sequence: ClassVar[bool] = False

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_names()

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter that runs and trains (None: none runs)."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the active adapter into the base weights (if the layer can)."""

    def unmerge(self) -> None:
        """Restore the base weights merge() changed, exactly."""

    def row_bias_deltas(self, row_names: list[str]):
        """In a mixed batch, a stand-in layer whose bias depends on the row's
        adapter: [rows, out], each row's bias minus the base's (None: the same
        for every row). An adapter layer wrapping it adds these to its output."""
        return None

    # --- what a forward reads ------------------------------------------------------
    @property
    def forward_context(self) -> ForwardContext | None:
        # None for a layer made by hand, outside pypeft.patch.
        return self.__dict__.get(CONTEXT_ATTR)

    def is_disabled(self) -> bool:
        context = self.__dict__.get(CONTEXT_ATTR)
        return context is not None and context.disabled

    def mixed_rows(self) -> list[str] | None:
        context = self.__dict__.get(CONTEXT_ATTR)
        return None if context is None else context.mixed_rows

    def token_positions(self, x, token_dim: int = 1):
        """The selected token positions of x while a token selection is
        active on this layer (TOKENS_ATTR), else None."""
        selection = self.__dict__.get(TOKENS_ATTR)
        return None if selection is None else selection.positions_for(x, token_dim)

    def bind(self, context: ForwardContext) -> None:
        """Join a patched model (patch() does this for every layer it adds)."""
        self.__dict__[CONTEXT_ATTR] = context


def underlying(module: nn.Module) -> nn.Module:
    """The model's own module a chain of stand-in layers wraps (the module
    itself when it is none)."""
    while isinstance(module, PypeftLayer) and module.stands_for_base:
        module = module.base_layer
    return module


def pypeft_layers(model: nn.Module) -> Iterator[PypeftLayer]:
    return (m for m in model.modules() if isinstance(m, PypeftLayer))
