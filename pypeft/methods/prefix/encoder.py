"""The trainable prefixes: one PrefixEncoder per adapter (peft's layout),
held by one PrefixEncoders layer that attach() puts on the top-level model.

peft's encoder output is [num_virtual_tokens, num_layers*2*token_dim]; viewed
as (n, num_layers*2, heads, head_dim), entry 2*b is block b's keys and entry
2*b+1 its values. Each attention computes only its own block, on demand:
nothing is kept between calls, so gradient checkpointing (which reruns a
layer in backward) and generate (which runs the model once per token) find
the prefix the same way a plain forward does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pypeft.layer import BASE, PypeftLayer
from pypeft.methods.prefix.geometry import Geometry


class PrefixEncoder(nn.Module):
    """peft's PrefixEncoder: an embedding of the whole prefix, or (projection)
    an embedding [n, token_dim] through Linear -> Tanh -> Linear."""

    def __init__(self, n: int, geo: Geometry, projection: bool, hidden: int):
        super().__init__()
        self.n, self.geo, self.projection = n, geo, projection
        if projection:
            self.embedding = nn.Embedding(n, geo.token_dim)
            self.transform = nn.Sequential(nn.Linear(geo.token_dim, hidden), nn.Tanh(),
                                           nn.Linear(hidden, geo.width))
        else:
            self.embedding = nn.Embedding(n, geo.width)

    def output(self) -> torch.Tensor:
        """The whole prefix [n, num_layers*2*token_dim] (peft's prompt_embeddings)."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block b's keys and values, each [heads, n, head_dim]."""
        geo, width = self.geo, self.geo.token_dim
        rows = slice(2 * b * width, (2 * b + 2) * width)
        if self.projection:  # only this block's rows of the last Linear
            hidden = self.transform[1](self.transform[0](self.embedding.weight))
            last = self.transform[2]
            kv = F.linear(hidden, last.weight[rows], last.bias[rows])
        else:
            kv = self.embedding.weight[:, rows]
        kv = kv.view(self.n, 2, geo.num_attention_heads, geo.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]


class PrefixEncoders(PypeftLayer):
    """Every prefix-tuning adapter of a model; the attention function asks it
    for the prefix of the active adapter (or of each row's, in a mixed batch).
    Not per token: TokenTune leaves it alone (the prefix is keys and values
    every query sees, trained through the selected queries)."""

    outside_sequence = True

    def __init__(self, geo: Geometry):
        super().__init__()
        self.geo = geo
        self.encoders = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str, n: int, projection: bool, hidden: int) -> None:
        encoder = PrefixEncoder(n, self.geo, projection, hidden)
        encoder.train(self.training)
        self.encoders[name] = encoder

    def adapter_names(self) -> list[str]:
        return list(self.encoders)

    def activate(self, name: str | None) -> None:
        self.active_adapter = name if name in self.encoders else None
        for adapter, encoder in self.encoders.items():
            encoder.requires_grad_(adapter == self.active_adapter)

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def row_adapters(self) -> list[str | None] | None:
        """In a mixed batch, each row's prefix adapter (None: no prefix); else None."""
        rows = self.mixed_rows()
        if rows is None:
            return None
        return [r if r != BASE and r in self.encoders else None for r in rows]

    def running(self) -> str | None:
        """The adapter whose prefix this (non-mixed) forward uses, or None."""
        if self.is_disabled():
            return None
        return self.active_adapter

    def lengths(self, batch: int) -> tuple[torch.Tensor, bool] | None:
        """Per row, the prefix length this forward uses, and whether every row
        has the same (None: no prefix anywhere). The flag is known without
        reading the tensor: under torch.compile, reading it broke the graph."""
        if self.is_disabled():
            return None
        rows = self.row_adapters()
        if rows is None:
            name = self.active_adapter
            return None if name is None else (torch.full((batch,), self.encoders[name].n, dtype=torch.long), True)
        if all(r is None for r in rows):
            return None
        lengths = [0 if r is None else self.encoders[r].n for r in rows]
        return torch.tensor(lengths, dtype=torch.long), len(set(lengths)) == 1

    def prefix(self, block: int, batch: int, like: torch.Tensor):
        """(keys, values [batch, heads, m, head_dim], valid [batch, m] bool or None)
        for this forward, or None when no row has a prefix. In a mixed batch,
        rows with a shorter prefix (or none) get masked slots at the front."""
        if self.is_disabled():
            return None
        rows = self.row_adapters()
        if rows is None:
            if self.active_adapter is None:
                return None
            k, v = self.encoders[self.active_adapter].block(block)
            k, v = k.to(like.dtype), v.to(like.dtype)
            shape = (batch, *k.shape)
            return k.unsqueeze(0).expand(shape), v.unsqueeze(0).expand(shape), None
        if all(r is None for r in rows):
            return None
        if len(rows) != batch:
            raise ValueError(f"pypeft.mixed_batch: argument 'adapter_names': expected one name per batch row "
                             f"({batch}), got {len(rows)}")
        m = max(self.encoders[r].n for r in rows if r is not None)
        geo = self.geo
        keys = like.new_zeros(batch, geo.num_attention_heads, m, geo.head_dim)
        values = like.new_zeros(batch, geo.num_attention_heads, m, geo.head_dim)
        valid = torch.zeros(batch, m, dtype=torch.bool, device=like.device)
        for name in dict.fromkeys(r for r in rows if r is not None):
            index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=like.device)
            k, v = self.encoders[name].block(block)
            n = k.shape[1]
            keys[index, :, m - n:] = k.to(like.dtype)
            values[index, :, m - n:] = v.to(like.dtype)
            valid[index, m - n:] = True
        return keys, values, valid
