"""Real tokens' positions under a prefix, as peft's: peft passes the prefix
as a KV cache of length n, so the model places the real tokens at n..n+L-1
(rotary and learned absolute positions alike). A forward pre-hook on the
top-level model passes position_ids where its forward takes them:

- given position_ids (generate passes them, from the attention mask): + n,
  as peft's _adjust_prompt_learning_kwargs does;
- else from the 2D attention mask (cumsum - 1, so left padding is right
  too), over the cached tokens and the new ones, the new ones' part, + n;
  without a mask: the cache length + 0..L-1, + n.

Models whose positions start above 0 (RoBERTa-likes: padding_idx + 1) get
that start added, and padding their padding position. In a mixed batch each
row is offset by its own prefix length. T5 (relative bias) takes no
position_ids: its attention function adds the prefix keys' bias instead.
"""

from __future__ import annotations

import torch
from torch import nn

from pypeft.models.positions import cache_length


def _cache_length(kwargs: dict) -> int:
    return cache_length(kwargs.get("cache", kwargs.get("past_key_values")))


class PositionHook:
    """The forward pre-hook. It also refuses to run a prefix adapter when the
    attention implementation was changed after patching (the prefix would be
    silently left out)."""

    def __init__(self, owner, padding_idx: int | None, shifts_positions: bool, implementation: str):
        self.owner = owner
        self.padding_idx = padding_idx
        self.shifts_positions = shifts_positions
        self.implementation = implementation

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        given = kwargs.get("position_ids")
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        if source is None:
            return None
        batch, length = source.shape[0], source.shape[1]
        lengths = self.owner.lengths(batch)
        if lengths is None:
            return None
        offsets, uniform = lengths  # uniform: False only in a mixed batch
        current = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if current != self.implementation:
            raise ValueError(f"pypeft prefix tuning: the model's attention implementation is {current!r}, but the "
                             f"prefix enters through {self.implementation!r}, set by pypeft.patch; changed after "
                             f"patching, the prefix would be left out. Call model.set_attn_implementation("
                             f"{self.implementation!r}) (or unpatch, change it, and patch again)")
        if not self.shifts_positions:
            return None
        if len(args) > 1:
            raise ValueError("pypeft prefix tuning: pass the model's inputs by keyword (input_ids=..., "
                             "attention_mask=...), so that it can shift position_ids past the prefix")
        offsets = offsets.to(source.device)[:, None]
        if given is not None:
            kwargs["position_ids"] = given + (offsets if given.dim() == 2 else offsets[None])
            return args, kwargs
        past = _cache_length(kwargs)
        mask = kwargs.get("attention_mask")
        real = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == past + length:
            real = mask[:, -length:].bool()
            positions = (mask.long().cumsum(-1) - 1)[:, -length:].clamp(min=0)
        else:
            positions = (torch.arange(length, device=source.device) + past)[None]
            if not uniform:  # rows of different prefix lengths
                positions = positions.expand(batch, length)
            else:  # one row of positions for all, as the model makes them itself: rotary tables stay [1, L]
                offsets = offsets[:1]
        positions = positions + offsets
        if self.padding_idx is not None:
            positions = positions + self.padding_idx + 1
            if real is not None:
                positions = positions.masked_fill(~real, self.padding_idx)
        kwargs["position_ids"] = positions
        return args, kwargs
