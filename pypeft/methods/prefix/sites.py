"""Which attention modules take a prefix, and which of peft's prefix blocks
each one reads.

peft passes the prefix as a KV cache, so a prefix reaches exactly the
attentions that read the cache: every layer's self-attention in a
decoder-only model or an encoder (BERT-likes; DistilBERT, which peft cannot
prefix-tune, gets the same), and in T5 only the decoder's self-attention
(peft 0.21 replaces the cross-attention cache with an empty one, and the
encoder reads no cache). For T5 peft also lays its prompt out oddly: it views
the encoder output as num_layers*2 entries, doubles it along that axis and
splits it into chunks of four (self key, self value, cross key, cross
value) per decoder layer, so decoder layer j's self-attention reads block
(2*j) mod num_layers, and the odd blocks feed the discarded cross-attention
cache. Matched here so that adapters move between pypeft and peft.

Every attention module of the model is tagged with a PrefixSite (block None:
no prefix): the attention function delegates for all of them and must know
the implementation to delegate to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pypeft.methods.prefix.geometry import Geometry
from pypeft.models.layer_stacks import layer_stacks

SITE_ATTR = "_pypeft_prefix_site"
_WHERE = "pypeft.patch(method='prefix_tuning')"


@dataclass(eq=False)
class PrefixSite:
    block: int | None      # peft's layer block this attention reads (None: no prefix)
    owner: Any             # the PrefixEncoders layer holding the adapters (not a submodule of the site)
    delegate: str          # the attention implementation the model used before patching
    bias_source: Any = None  # T5: the stack's attention holding relative_attention_bias


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention")


def _leaf_attentions(module: nn.Module) -> list[nn.Module]:
    """Attention modules with no attention module inside them (BertSelfAttention,
    not BertAttention; T5Attention, not T5LayerSelfAttention), in module order."""
    return [m for m in module.modules() if _is_attention(m) and not any(_is_attention(c) for c in m.modules()
                                                                          if c is not m)]


def find_sites(model: nn.Module, geo: Geometry) -> tuple[list[tuple[nn.Module, int | None]], Any]:
    """[(attention module, block or None)] for every attention module, and
    the decoder stack's relative-bias attention for T5 (else None)."""
    stacks = layer_stacks(model)
    if not stacks:
        raise ValueError(f"{_WHERE}: argument 'model': {type(model).__name__} has no stack of transformer layers")
    config = model.config
    if geo.num_transformer_submodules == 2:
        if getattr(config, "model_type", None) not in ("t5", "mt5"):
            raise ValueError(f"{_WHERE}: argument 'model': encoder-decoder models other than T5 are not supported "
                             f"(got model_type {config.model_type!r})")
        prefixed = [s for s in stacks if s.name.rsplit(".", 1)[-1] == "decoder"]
    else:
        prefixed = stacks
    if len(prefixed) != 1:
        raise ValueError(f"{_WHERE}: argument 'model': expected one stack of layers to prefix, found "
                         f"{[s.name for s in prefixed]}")
    stack = prefixed[0]
    blocks: dict[nn.Module, int] = {}
    for i, layer in enumerate(stack.layers):
        found = _leaf_attentions(layer)
        if not found:
            raise ValueError(f"{_WHERE}: argument 'model': layer {i} of {stack.name or 'the model'} has no attention "
                             "module pypeft recognises")
        attention = found[0]  # self-attention comes first in every supported family
        index = attention.layer_idx if isinstance(getattr(attention, "layer_idx", None), int) else i
        if geo.num_transformer_submodules == 2:
            block = (2 * index) % geo.num_layers if index < geo.num_layers else None
        else:
            block = index if index < geo.num_layers else None
        blocks[attention] = block
    bias_source = None
    if geo.num_transformer_submodules == 2:
        bias_source = next((m for m in stack.module.modules() if _is_attention(m)
                            and getattr(m, "has_relative_attention_bias", False)), None)
    sites = [(m, blocks.get(m)) for m in _leaf_attentions(model)]
    return sites, bias_source
