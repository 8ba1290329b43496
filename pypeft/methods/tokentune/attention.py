"""TokenTune's attention, plugged into transformers' attention interface.

transformers (5.x) computes attention in BERT, RoBERTa, GPT-2, Llama, Mistral,
Qwen2 and others through ALL_ATTENTION_FUNCTIONS[config._attn_implementation],
with the signature of sdpa_attention_forward. Registering one function under
IMPLEMENTATION (and sdpa's mask builder under the same name, without which
transformers builds no padding mask for an unknown implementation) lets
pypeft own attention without copying any modeling file.

The function runs pypeft::token_subset_attention when the calling attention
module carries an active token selection (pypeft.layer.TOKENS_ATTR), and transformers'
own SDPA path otherwise (eval, no_grad, or a module TokenTune did not tag).
"""

from __future__ import annotations

import torch

from pypeft.layer import TOKENS_ATTR
from pypeft.ops import token_subset_attention

IMPLEMENTATION = "pypeft_token_subset"


def _dropout_seed(p: float, like: torch.Tensor) -> torch.Tensor | None:
    # A fresh mask every step, as a tensor so torch.compile keeps one graph.
    return torch.randint(0, 2**62, (), device=like.device) if p > 0.0 else None


def token_subset_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: torch.Tensor | None,
                                   dropout: float = 0.0, scaling: float | None = None,
                                   is_causal: bool | None = None, **kwargs):
    selection = getattr(module, TOKENS_ATTR, None)
    positions = selection.positions_for(query, token_dim=2) if selection is not None else None
    if positions is None or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    # The same causal decision as transformers' SDPA path.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = token_subset_attention(query, key, value, attention_mask, float(scale), is_causal, float(dropout),
                                 _dropout_seed(dropout, query), positions)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function and its mask builder (idempotent)."""
    # Imported here: `import pypeft` need not load transformers' attention code.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, token_subset_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
