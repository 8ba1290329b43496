"""The prefix's shape for a model, as peft's _prepare_prompt_learning_config
computes it (so that adapter files agree with peft's): num_layers, token_dim
and num_attention_heads from the model config, with grouped- and multi-query
attention's key/value heads in place of the query heads (peft #1901), and
num_transformer_submodules 2 for an encoder-decoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_WHERE = "pypeft.patch(method='prefix_tuning')"


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    token_dim: int            # heads * head_dim of one layer's keys (or values)
    num_attention_heads: int  # key/value heads
    num_transformer_submodules: int

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    @property
    def width(self) -> int:
        """Columns of peft's prompt_embeddings: every layer's key and value."""
        return self.num_layers * 2 * self.token_dim


def _first(config: dict, *keys):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def geometry(model: nn.Module) -> Geometry:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{_WHERE}: argument 'model': expected a transformers model (with a config), "
                         f"got {type(model).__name__}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = text.to_dict()
    layers = getattr(text, "num_hidden_layers", None) or _first(fields, "num_hidden_layers", "num_layers", "n_layer")
    # peft reads hidden_size / n_embd / d_model; DistilBERT calls it `dim` (peft finds none and refuses).
    token_dim = _first(fields, "hidden_size", "n_embd", "d_model", "dim")
    heads = _first(fields, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "n_heads")
    if not (layers and token_dim and heads):
        raise ValueError(f"{_WHERE}: argument 'model': cannot read the number of layers, hidden size and attention "
                         f"heads from {type(config).__name__}")
    if "num_key_value_heads" in fields:
        kv_heads = fields["num_key_value_heads"] or heads
        head_dim = fields.get("head_dim") or token_dim // heads
        token_dim, heads = head_dim * kv_heads, kv_heads
    return Geometry(int(layers), int(token_dim), int(heads), 2 if getattr(config, "is_encoder_decoder", False) else 1)
