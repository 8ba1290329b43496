"""pypeft::token_subset_attention: TokenTune's attention.

    out = softmax(q kᵀ · scale + mask) v        per query head, every query token

Forward values equal torch.nn.functional.scaled_dot_product_attention(query,
key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa=True) (with
dropout_p > 0, with pypeft's counter-hash mask on the probabilities instead of
torch's RNG: row (b * Hq + h) * T + t, column s). Gradients are those of a
model in which only the selected queries (positions) are differentiable: the
unselected queries' outputs are constants, so grad_query is zero there, while
grad_key and grad_value carry what the selected queries send to every key.

Saved for backward: the selected query rows [B, Hq, k, D], key, value, the
mask, seed and positions; nothing of size T×S or B×Hq×T×D.

Layout of transformers' attention interface: query [B, Hq, T, D], key
[B, Hkv, S, D], value [B, Hkv, S, Dv], Hq a multiple of Hkv. out is
[B, Hq, T, Dv] with memory laid out as [B, T, Hq, Dv] (what the interface
transposes it to next).

Masks: attn_mask is None, bool (True = attend) or additive of query's dtype,
broadcastable to [B, Hq, T, S]; is_causal is SDPA's top-left causal mask and
excludes attn_mask. A query whose keys are all masked (padding) gets output 0,
as SDPA gives, and zero gradient: its probabilities are the constant 0.

dtypes: query, key, value share float32, float64 or bfloat16 (float16 too on
CUDA); backward computes in float32 for bfloat16/float16. The mask takes no
gradient (a trainable bias such as T5's position bias is rejected in backward).
"""

from __future__ import annotations

import math

import torch

from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.token_subset_attention.default
_backward_op = torch.ops.pypeft.token_subset_attention_backward.default


def token_subset_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Attention whose gradients flow through the selected queries only.

    Args:
        query: [B, Hq, T, D]; key: [B, Hkv, S, D]; value: [B, Hkv, S, Dv].
        attn_mask: None, bool or additive, broadcastable to [B, Hq, T, S].
        scale: factor of q kᵀ; None for 1 / sqrt(D), as SDPA.
        is_causal: query t attends to keys s <= t (not with attn_mask).
        dropout_p: dropout probability on the attention probabilities, in [0, 1).
        seed: 0-dim int64 tensor choosing the dropout mask (needed when dropout_p > 0).
        positions: [B, k] int64, distinct per row: the query tokens that train.
    Returns:
        out: [B, Hq, T, Dv].
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return _op(query, key, value, attn_mask, scale, is_causal, dropout_p, seed, positions)[0]


@torch.library.register_fake("pypeft::token_subset_attention")
def _token_subset_attention_fake(query, key, value, attn_mask, scale, is_causal, dropout_p, seed,
                                 positions):
    torch._check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4,
                 lambda: "pypeft.token_subset_attention: query, key, value must be 4-D")
    torch._check(positions.dim() == 2,
                 lambda: "pypeft.token_subset_attention: argument 'positions': expected [B, k]")
    B, Hq, T, D = query.shape
    out = query.new_empty((B, T, Hq, value.shape[3])).transpose(1, 2)
    query_rows = query.new_empty((B, Hq, positions.shape[1], D))
    return out, query_rows


@torch.library.register_fake("pypeft::token_subset_attention_backward")
def _token_subset_attention_backward_fake(grad_out, query_rows, key, value, attn_mask, scale,
                                          is_causal, dropout_p, seed, positions, output_mask):
    need_query, need_key, need_value = output_mask
    B, Hq, _, D = query_rows.shape
    return (
        query_rows.new_empty((B, Hq, grad_out.shape[2], D)) if need_query else None,
        torch.empty_like(key, memory_format=torch.contiguous_format) if need_key else None,
        torch.empty_like(value, memory_format=torch.contiguous_format) if need_value else None,
    )


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, scale, is_causal, dropout_p, seed, positions = inputs
    # query_rows is returned to be saved (here, or by another op reading the same
    # query); gradients reach query through out only.
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], key, value, attn_mask, seed, positions)
    ctx.scale, ctx.is_causal, ctx.dropout_p = scale, is_causal, dropout_p


def _backward(ctx, grad_out, grad_query_rows):
    query_rows, key, value, attn_mask, seed, positions = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[3]:
        raise RuntimeError("pypeft.token_subset_attention: attn_mask takes no gradient; "
                           "it must not require grad")
    grad_query, grad_key, grad_value = _backward_op(
        grad_out, query_rows, key, value, attn_mask, ctx.scale, ctx.is_causal, ctx.dropout_p,
        seed, positions, [need[0], need[1], need[2]],
    )
    return grad_query, grad_key, grad_value, None, None, None, None, None, None


torch.library.register_autograd("pypeft::token_subset_attention", _backward,
                                setup_context=_setup_context)

forbid_double_backward("pypeft::token_subset_attention_backward", "pypeft.token_subset_attention")
