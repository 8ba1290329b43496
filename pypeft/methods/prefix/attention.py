"""Prefix tuning's attention function, registered with transformers'
AttentionInterface (the seam TokenTune uses too).

Every attention module of a patched model calls it. It finds the calling
module's PrefixSite, puts the prefix keys/values before the layer's keys and
values (after the layer updated the user's KV cache: the cache holds real
tokens only), opens the prefix columns of the mask (a 4D bool or additive
mask gets allowed columns in front; a missing mask of a causal attention
becomes an explicit one in which every query sees every prefix slot and the
real keys causally), adds T5's relative-position-bias columns for the prefix
keys as peft's cache of length n gives them, and hands everything to the
implementation it wraps: the one the model used before patching (sdpa or
eager), or TokenTune's token-subset attention, whichever was patched first.

With a prefix, is_causal is always passed as False: SDPA's (and the
token-subset op's) is_causal is a top-left causal mask, wrong once prefix keys
stand in front; a causal attention gets the explicit mask instead. Under
TokenTune the prefix slots are keys and values, not tokens of the sequence:
every query, selected or not, sees them, and their parameters get gradients
through the selected queries only ("virtual tokens are always selected").
"""

from __future__ import annotations

import torch

from pypeft.methods.prefix.sites import SITE_ATTR
from pypeft.methods.tokentune.attention import IMPLEMENTATION as TOKEN_SUBSET

PREFIX = "pypeft_prefix_"  # + the delegate: one registered name per mask format


def _delegate(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":  # eager is each model's own function, not in the registry
        return None
    return ALL_ATTENTION_FUNCTIONS[name]


def _extend_mask(mask, valid, q: int, k: int, m: int, causal: bool, delegate: str, like: torch.Tensor):
    """The mask for [m prefix slots, k real keys]; valid [batch, m] marks the
    slots a row may see (None: all)."""
    batch = like.shape[0]
    if mask is None:
        if valid is None and not (causal and q > 1):
            return None
        if delegate == "eager" and valid is None:
            return None  # eager masks nothing without a mask: nothing to keep causal
        real = torch.ones(q, k, dtype=torch.bool, device=like.device)
        if causal:
            real = torch.tril(real, diagonal=k - q)  # query i sits at position k - q + i
        mask = real.expand(batch, 1, q, k)
        if delegate == "eager":
            mask = torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(~mask, torch.finfo(like.dtype).min)
    if mask.dim() != 4:
        raise ValueError(f"pypeft prefix tuning: expected a 4D attention mask (or None) in attention, got shape "
                         f"{tuple(mask.shape)}")
    rows = mask.shape[0] if valid is None else batch
    allowed = torch.ones(rows, 1, mask.shape[2], m, dtype=torch.bool, device=mask.device)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :].to(mask.device)
        mask = mask.expand(batch, *mask.shape[1:])
    allowed = allowed.expand(mask.shape[0], mask.shape[1], mask.shape[2], m)
    if mask.dtype == torch.bool:
        front = allowed
    else:
        front = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~allowed, torch.finfo(mask.dtype).min)
    return torch.cat([front, mask], dim=-1)


def _t5_bias_columns(source, position_bias: torch.Tensor, q: int, k: int, m: int) -> torch.Tensor:
    """Relative-position bias of the m prefix slots: slot s sits at position
    s - m before the first real token's (peft's cache puts the prefix at
    0..n-1 and real tokens after it; only differences count)."""
    device = position_bias.device
    context = torch.arange(q, device=device)[:, None] + (k - q)
    memory = torch.arange(m, device=device)[None, :] - m
    bucket = source._relative_position_bucket(memory - context, bidirectional=not source.is_decoder,
                                              num_buckets=source.relative_attention_num_buckets,
                                              max_distance=source.relative_attention_max_distance)
    table = source.relative_attention_bias.weight
    # T5's first layer owns the bias table every later layer's prefix columns read. Under FSDP2
    # (fully_shard per block) that layer is resharded once its forward ends, so a later layer
    # finds a DTensor shard here: gather it (a collective, which every rank reaches in the same
    # layer). T5 itself never meets this: it computes its bias in the first layer and passes it on.
    full_tensor = getattr(table, "full_tensor", None)
    if full_tensor is not None:
        table = full_tensor()
    values = torch.nn.functional.embedding(bucket, table).permute(2, 0, 1).unsqueeze(0).to(position_bias.dtype)
    return values.expand(position_bias.shape[0], position_bias.shape[1], q, m)


def prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs):
    site = module.__dict__.get(SITE_ATTR)
    if site is None:
        raise RuntimeError(f"pypeft prefix tuning: {type(module).__name__} calls the prefix attention function but "
                           "was not tagged when the model was patched; unpatch and patch the model again")
    delegate = _delegate(site.delegate)
    prefix = site.owner.prefix(site.block, key.shape[0], key) if site.block is not None else None
    if prefix is not None:
        pk, pv, valid = prefix
        if pk.shape[1] != key.shape[1] or pk.shape[-1] != key.shape[-1]:
            raise ValueError(f"pypeft prefix tuning: the prefix has {pk.shape[1]} heads of size {pk.shape[-1]}, but "
                             f"{type(module).__name__} computes keys with {key.shape[1]} heads of size "
                             f"{key.shape[-1]}; the adapter was made for another model")
        q, k, m = query.shape[2], key.shape[2], pk.shape[2]
        causal = kwargs.get("is_causal")
        causal = bool(causal if causal is not None else getattr(module, "is_causal", True))
        attention_mask = _extend_mask(attention_mask, valid, q, k, m, causal, site.delegate, query)
        bias = kwargs.get("position_bias")
        if bias is not None:
            front = _t5_bias_columns(site.bias_source, bias, q, k, m) if site.bias_source is not None else \
                bias.new_zeros(*bias.shape[:-1], m)
            kwargs["position_bias"] = torch.cat([front, bias], dim=-1)
        kwargs["is_causal"] = False  # causality, if any, is in the explicit mask
        key = torch.cat([pk.to(key.device), key], dim=2)
        value = torch.cat([pv.to(value.device), value], dim=2)
    if delegate is None:
        return _eager(module)(module, query, key, value, attention_mask, **kwargs)
    return delegate(module, query, key, value, attention_mask, **kwargs)


def _eager(module: torch.nn.Module):
    """The eager function of the module's own modeling file (each family has one)."""
    import sys

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"pypeft prefix tuning: {type(module).__module__} has no eager_attention_forward")
    return fn


# What the prefix can wrap: transformers' two that every family has, and
# TokenTune's (which takes sdpa's masks and runs sdpa when no token selection is active).
SUPPORTED = ("sdpa", "eager", TOKEN_SUBSET)


def inner(name: str) -> str | None:
    """The implementation a prefix implementation name wraps (None: not one)."""
    return name[len(PREFIX):] if isinstance(name, str) and name.startswith(PREFIX) else None


def implementation(previous: str) -> str:
    return f"{PREFIX}{previous}"


def register(previous: str) -> str:
    """Register the attention function under a name per delegate, with the
    delegate's mask builder (sdpa and TokenTune's: bool masks or None; eager:
    additive), and return the name (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = implementation(previous)
    AttentionInterface.register(name, prefix_attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name
