"""TokenTune's token selection: which k tokens of each sequence carry
gradients in the current training forward. One TokenSelection per model,
shared by every token-subset module; a forward pre-hook on the model draws
the positions (training mode with grad enabled only) and a forward hook
clears them. The positions are per thread (a PerThread), so two threads
running one model do not read each other's selection.

Virtual tokens (prompt tuning, P-tuning): their method rewrites the call in a
pre-hook that runs before this one, and says where the slots are it put into
the sequence (pypeft.layer.VIRTUAL_TOKENS_ATTR). Those slots are always
selected, in addition to the k tokens chosen among the call's own tokens as
TokenTune alone would choose them (k, fraction, keep and a selector count
those tokens only): the prompts are what trains, and a slot left out would
send them no gradient. So a row carries W + k selected positions (W: the
slots per row, in a mixed batch including masked pad slots, which send none).
A last-token classifier reads the sequence's end, where the rewriting puts
each row's last real token's hidden state (a pad's position under right
padding): that position is selected too (W + 1 + k; k and the selector then
count the tokens before it).
The input embedding ran inside that pre-hook, before any selection was drawn,
so its output is not gated; gradients are the same (every path from a token's
embedding to the loss passes a token-subset module, a norm or a linear layer,
constant at an unselected token), as tests/test_prompt_tokentune.py checks
with the embedding trainable.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from pypeft.layer import VIRTUAL_TOKENS_ATTR, PerThread, VirtualSlots
from pypeft.methods.tokentune.config import TokenTuneConfig


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_decoder(model: nn.Module) -> bool:
    """Whether the model's attention is causal (its modules say is_causal)."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _random_positions(mask: torch.Tensor, k: int, keep: Sequence[int],
                      generator: torch.Generator | None) -> torch.Tensor:
    """[B, k]: per row, the `keep` positions (among non-padding tokens) and
    others uniformly at random among non-padding tokens; padding only fills
    rows with fewer than k tokens (it then carries no gradient anyway)."""
    B, T = mask.shape
    scores = torch.rand(B, T, generator=generator)
    valid = mask.cpu()
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    rank = valid.long().cumsum(1) - 1  # index among the non-padding tokens
    lengths = valid.sum(1, keepdim=True)
    for i in keep:
        target = torch.full_like(lengths, i) if i >= 0 else lengths + i
        scores = torch.where(valid & (rank == target), torch.full_like(scores, 2.0), scores)
    return scores.topk(k, dim=1).indices.sort(1).values


class _Current(PerThread):
    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.tokens = 0  # T of the current selection


class TokenSelection:
    """The tokens of the current training forward, shared by every
    token-subset module of one model. `positions` is set by a pre-hook on the
    model's forward (training mode with grad enabled only) and cleared after."""

    def __init__(self, config: TokenTuneConfig, model: nn.Module):
        self.config = config
        self.keep = ((0, -1) if is_decoder(model) else (0,)) if config.keep == "auto" else tuple(config.keep)
        self.causal = is_decoder(model)
        self._generator: torch.Generator | None = None  # made at the first draw (see generator)
        self._current = _Current()
        self._signature = inspect.signature(model.forward)

    @property
    def generator(self) -> torch.Generator | None:
        """The random selector's generator: None without a seed (torch's
        global RNG); else seeded with seed + rank (torch.distributed's rank,
        0 in one process), so data-parallel ranks draw different selections
        and each rank's draws are reproducible. Made at the first draw, not at
        patch(), so a model patched before init_process_group still gets its
        rank's seed."""
        if self.config.seed is not None and self._generator is None:
            self._generator = torch.Generator().manual_seed(self.config.seed + _rank())
        return self._generator

    @property
    def positions(self) -> torch.Tensor | None:
        return self._current.positions

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        self._current.positions = value

    @property
    def tokens(self) -> int:
        return self._current.tokens

    @tokens.setter
    def tokens(self, value: int) -> None:
        self._current.tokens = value

    def snapshot(self) -> tuple[torch.Tensor | None, int]:
        """The selection in force (checkpointing.py replays it)."""
        return self.positions, self.tokens

    @contextlib.contextmanager
    def replaying(self, snapshot: tuple[torch.Tensor | None, int]):
        """The selection `snapshot` in force in this thread for the block
        (a checkpointed layer recomputed in backward), the previous one after."""
        previous = self.snapshot()
        self.positions, self.tokens = snapshot
        try:
            yield
        finally:
            self.positions, self.tokens = previous

    def positions_for(self, x: torch.Tensor, token_dim: int = 1) -> torch.Tensor | None:
        """The positions when a selection is active and x is [B, T, ...] of it
        (dims 0 and token_dim); None otherwise (the module runs unchanged)."""
        p = self.positions
        if p is None or x.dim() <= max(token_dim, 1) or x.shape[0] != p.shape[0]:
            return None
        return p if x.shape[token_dim] == self.tokens else None

    # --- choosing ---------------------------------------------------------------------

    def choose(self, input_ids, attention_mask, batch: int, tokens: int, device) -> torch.Tensor:
        k = self.config.tokens_for(tokens)
        if callable(self.config.selector):
            got = self.config.selector(input_ids, attention_mask, k)
            return self._checked(got, batch, tokens, k).to(device)
        if attention_mask is None:
            mask = torch.ones(batch, tokens, dtype=torch.bool)
        else:
            mask = attention_mask.detach().to("cpu").bool()
        return _random_positions(mask, k, self.keep, self.generator).to(device)

    @staticmethod
    def _checked(got, batch: int, tokens: int, k: int) -> torch.Tensor:
        where = "pypeft.patch(method='tokentune'): argument 'selector'"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.int64:
            raise ValueError(f"{where}: expected it to return an int64 tensor [batch, k], got "
                             f"{got.dtype if isinstance(got, torch.Tensor) else type(got).__name__}")
        if tuple(got.shape) != (batch, k):
            raise ValueError(f"{where}: expected positions of shape [{batch}, {k}], got {list(got.shape)}")
        if got.numel() and (got.min() < 0 or got.max() >= tokens):
            raise ValueError(f"{where}: expected positions in [0, {tokens}), got values in "
                             f"[{got.min().item()}, {got.max().item()}]")
        ordered = got.sort(1).values
        if k > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"{where}: expected distinct positions in each row, got a repeated one")
        return ordered

    # --- the hooks on the model's forward --------------------------------------------------

    # Run eagerly under torch.compile: traced, a draw from the seeded generator
    # broke the graph inside the hook and the selection it stored was lost to
    # the traced layers, which then ran in full (wrong gradients, no error).
    @torch.compiler.disable
    def before_forward(self, model: nn.Module, args, kwargs):
        self.positions = None
        if not (model.training and torch.is_grad_enabled()):
            return None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        input_ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        if shaped is None or shaped.dim() < 2:
            return None
        batch, tokens = shaped.shape[0], shaped.shape[1]
        attention_mask = bound.get("attention_mask")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, tokens):
            attention_mask = None  # a 4-D mask the model builds on: select among all tokens
        self.tokens = tokens
        virtual = model.__dict__.get(VIRTUAL_TOKENS_ATTR)
        slots = virtual.virtual_slots() if virtual is not None else None
        if slots is not None and tuple(slots.slots.shape) == (batch, tokens):
            self.positions = self._with_slots(slots, attention_mask, shaped.device)
        else:
            self.positions = self.choose(input_ids, attention_mask, batch, tokens, shaped.device)
        labels = bound.get("labels")
        if self.config.loss_on_selected and isinstance(labels, torch.Tensor) and tuple(labels.shape) == (batch, tokens):
            return self._with_labels(args, kwargs, self._selected_labels(labels))
        return None

    def _with_slots(self, virtual: VirtualSlots, attention_mask, device) -> torch.Tensor:
        """[B, W + k]: every slot, and k of each row's own tokens chosen as
        without the slots (from the tokens' ids and mask)."""
        slots = virtual.slots
        batch, length = slots.shape
        index = torch.arange(length, device=slots.device).expand(batch, -1)
        width = int(slots.sum()) // batch if batch else 0  # as many per row
        slot_index = index[slots].view(batch, width)
        token_index = index[~slots].view(batch, length - width)  # each row's own tokens, in order
        ids = virtual.input_ids
        if virtual.end:  # the last position is always selected; the others are chosen
            slot_index = torch.cat((slot_index, token_index[:, -1:]), 1)
            token_index, ids = token_index[:, :-1], None if ids is None else ids[:, :-1]
        mask = None if attention_mask is None else attention_mask.gather(1, token_index.to(attention_mask.device))
        chosen = self.choose(ids, mask, batch, token_index.shape[1], slots.device)
        return torch.cat((slot_index, token_index.gather(1, chosen)), 1).sort(1).values.to(device)

    def _with_labels(self, args, kwargs, labels):
        if "labels" in kwargs:
            return args, {**kwargs, "labels": labels}
        index = list(self._signature.parameters).index("labels")
        return (*args[:index], labels, *args[index + 1:]), kwargs

    def after_forward(self, *unused):
        self.positions = None

    def _selected_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """labels with every term outside the selection set to -100 (ignored).
        For a causal LM, label t + 1 is predicted at position t."""
        selected = torch.zeros_like(labels, dtype=torch.bool).scatter_(1, self.positions, True)
        keep = selected
        if self.causal:
            keep = torch.zeros_like(selected)
            keep[:, 1:] = selected[:, :-1]
        return torch.where(keep, labels, torch.full_like(labels, -100))


