"""Dropout drawn from pypeft's counter hash instead of torch's Bernoulli RNG.

torch's dropout draws each mask with the Bernoulli RNG, which on a CPU is
about half of a BERT layer's train-mode forward (mostly the attention
probabilities: B × heads × T × T draws a layer), and SDPA with dropout falls
back to its math path. pypeft's counter_dropout (a hash of (seed, row,
column), as TokenTune's and the adapter ops use) is several times cheaper and
regenerates its mask in backward from the seed instead of keeping it. So:

- every torch.nn.Dropout swapped here gets the class CounterHashDropout: in
  training mode it applies counter_dropout with the same p (kept elements
  scaled by 1 / (1 - p)), in eval mode it is the identity, as before. The
  class swap keeps each module, its place and its (empty) state dict;
  unswap_dropouts swaps the class back. Only modules of exactly nn.Dropout
  are swapped: a subclass may do more than drop.
- a model computing attention with transformers' "sdpa" gets a registered
  wrapper of it as its attention implementation: with dropout > 0 it computes
  softmax(q kᵀ · scale + mask) with counter_dropout on the probabilities
  (row (b * heads + h) * T + t, column s, as pypeft::token_subset_attention),
  then · v; otherwise (eval mode, dropout 0, T5's position bias, sliding
  windows and other extras) it calls SDPA's function unchanged, with SDPA's
  mask builder registered under the wrapper's name. restore_attention puts
  "sdpa" back. ("eager" is not wrapped: each model family has its own eager
  function, which the wrapper could not fall back to; such a model keeps
  torch's dropout on the attention probabilities.)

Both are differentiable (counter_dropout's backward applies the same mask).
READ uses them on the stacks it runs under no_grad while it is attached;
`counter_hash_dropout(model)` (exported as pypeft.counter_hash_dropout) puts
a whole model on them for a training run, whatever its methods.

Each call draws its seed from torch's global RNG (torch.randint, as
TokenTune's dropout does), so a forward is reproducible under
torch.manual_seed and every step gets fresh masks. The masks differ from
torch's draws, their law does not: each element is kept with probability
1 - p, independently (tests/test_read_dropout.py checks the rate and scale).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from pypeft.ops import counter_dropout

WRAPPED = "sdpa"  # the attention implementation wrapped
IMPLEMENTATION = "pypeft_counter_hash_sdpa"
# Arguments of transformers' attention interface that the counter-hash path
# may ignore (they do not change what attention computes); any other
# argument given a value sends the call to the original function.
_HARMLESS = frozenset({"encoder_hidden_states", "position_ids", "use_cache", "output_attentions", "cache_position"})


def _seed(like: torch.Tensor) -> torch.Tensor:
    # From torch's global RNG, as a tensor so torch.compile keeps one graph.
    return torch.randint(0, 2**62, (), device=like.device)


class CounterHashDropout(nn.Dropout):
    """nn.Dropout whose training-mode mask is counter_dropout's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.inplace:
            return super().forward(x)
        return counter_dropout(x, self.p, _seed(x))


def swap_dropouts(stacks: list[nn.Module]) -> list[nn.Module]:
    """Give the nn.Dropout modules inside `stacks` the counter-hash forward;
    returns the modules swapped (for unswap_dropouts)."""
    swapped = []
    for stack in stacks:
        for module in stack.modules():
            if type(module) is nn.Dropout:
                module.__class__ = CounterHashDropout
                swapped.append(module)
    return swapped


def unswap_dropouts(swapped: list[nn.Module]) -> None:
    for module in swapped:
        if type(module) is CounterHashDropout:
            module.__class__ = nn.Dropout


def counter_hash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None, p: float, scale: float, is_causal: bool) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask), dropped out by counter_dropout, · v:
    [B, Hq, T, Dv], as transformers' eager attention (key and value heads
    repeated for grouped queries; a bool mask is True where a query attends,
    and masked scores get the dtype's lowest value, as eager's additive mask;
    is_causal without a mask is SDPA's top-left causal mask)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    lowest = torch.finfo(scores.dtype).min
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, lowest)
        else:
            scores.add_(mask)
    elif is_causal and query.shape[2] > 1:
        allowed = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        scores.masked_fill_(~allowed, lowest)
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(counter_dropout(probs, p, _seed(probs)), value)


def counter_hash_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention interface (sdpa_attention_forward's
    signature): counter_hash_attention when it drops out, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extras = any(v is not None for k, v in kwargs.items() if k not in _HARMLESS)
    if dropout == 0.0 or extras or query.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # transformers' SDPA path decides causality the same way.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = counter_hash_attention(query, key, value, attention_mask, float(dropout), float(scale), causal)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the wrapper and SDPA's mask builder under IMPLEMENTATION
    (idempotent); returns the name."""
    # Imported here: `import pypeft` need not load transformers' attention code.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, counter_hash_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION


def use_counter_hash_attention(model: nn.Module) -> str | None:
    """Set the model's attention implementation to the wrapper of SDPA's;
    returns the name it had (to restore), or None when it is left alone (a
    model whose implementation cannot be set, or is not SDPA)."""
    config = getattr(model, "config", None)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if config is None or can_set is None or not can_set():
        return None
    original = getattr(config, "_attn_implementation", None)
    if original != WRAPPED:
        return None
    model.set_attn_implementation(register())
    return original


def restore_attention(model: nn.Module, original: str | None) -> None:
    if original is not None:
        model.set_attn_implementation(original)


@contextmanager
def counter_hash_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s nn.Dropout modules and its SDPA attention
    dropout draw their masks from the counter hash (module docstring): the
    same law as torch's dropout, a cheaper draw, no mask kept for backward.
    On a 2-core CPU a training step of the MiniLM-shaped classifier with VeRA
    took 0.74x its time with torch's dropout (benchmarks/RESULTS.md). On exit,
    by any path, the modules' classes and the attention implementation are
    what they were.

        with pypeft.counter_hash_dropout(model):
            trainer.train()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pypeft.counter_hash_dropout: argument model: expected a torch.nn.Module, "
                        f"got {type(model).__name__}")
    swapped = swap_dropouts([model])
    try:
        original = use_counter_hash_attention(model)
        try:
            yield model
        finally:
            restore_attention(model, original)
    finally:
        unswap_dropouts(swapped)

