"""Token positions in transformers models, for methods that put virtual
tokens or slots before the real ones (prompt tuning, prefix tuning) and so
must pass position_ids themselves."""

from __future__ import annotations

import inspect

from torch import nn


def accepts_position_ids(model: nn.Module) -> bool:
    """Whether the model's forward takes position_ids."""
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def position_padding_idx(model: nn.Module) -> int | None:
    """padding_idx of a learned position embedding that reserves one, else
    None. Such families (RoBERTa-likes) count real positions from
    padding_idx + 1 and give padding the position padding_idx."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and \
                module.padding_idx is not None:
            return int(module.padding_idx)
    return None


def first_position(model: nn.Module) -> int:
    """The position of a sequence's first token (0, or padding_idx + 1)."""
    padding_idx = position_padding_idx(model)
    return 0 if padding_idx is None else padding_idx + 1


def cache_length(cache) -> int:
    """Tokens a KV cache holds already (0 for none): a transformers Cache, or
    the legacy tuple of per-layer (key, value)."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0
