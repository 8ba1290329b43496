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

from pypeft.ops import _checks
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


# --- fake kernels: the checks of csrc/include/pypeft/token_subset_attention.h -------------

_OP, _BACKWARD_OP = "pypeft.token_subset_attention", "pypeft.token_subset_attention_backward"


def _check_args(op, q_arg, queries, tokens, key, value, attn_mask, scale, is_causal, dropout_p, seed):
    """queries: query (forward) or query_rows (backward), giving B, Hq and D;
    tokens: T (query.size(2), or grad_out's in backward)."""
    for name, t in ((q_arg, queries), ("key", key), ("value", value)):
        _checks.check_dim(op, name, t, 4)
    _checks.check_activation_dtype(op, q_arg, queries)
    _checks.check_same_dtype(op, "key", key, q_arg, queries)
    _checks.check_same_dtype(op, "value", value, q_arg, queries)
    _checks.check_same_device(op, "key", key, q_arg, queries)
    _checks.check_same_device(op, "value", value, q_arg, queries)
    B, Hq, _, D = queries.shape
    Hkv, S = key.shape[1], key.shape[2]
    _checks.check_size(op, "key", key, 0, B, "batch B, from query [B, Hq, T, D]")
    heads = f"a number of heads Hkv dividing query's Hq = {Hq} (grouped K/V heads)"
    _checks.check_value(Hkv > 0, op, "key", heads, f"shape {_checks.shape_str(key.shape)}")
    _checks.check_value(Hq % Hkv == 0, op, "key", heads, f"shape {_checks.shape_str(key.shape)}")
    _checks.check_size(op, "key", key, 3, D, "head dim D, from query [B, Hq, T, D]")
    _checks.check_size(op, "value", value, 0, B, "batch B, from query [B, Hq, T, D]")
    _checks.check_size(op, "value", value, 1, Hkv, "K/V heads Hkv, from key [B, Hkv, S, D]")
    _checks.check_size(op, "value", value, 2, S, "key tokens S, from key [B, Hkv, S, D]")
    if attn_mask is not None:
        m = attn_mask
        _checks.check_type(m.dtype == torch.bool or m.dtype == queries.dtype, op, "attn_mask",
                           f"dtype Bool or {_checks.dtype_name(queries.dtype)} (the dtype of '{q_arg}')",
                           _checks.dtype_name(m.dtype))
        _checks.check_same_device(op, "attn_mask", m, q_arg, queries)
        full = (B, Hq, tokens, S)
        expected = f"a shape broadcastable to [B, Hq, T, S] = {_checks.shape_str(full)}"
        got = f"shape {_checks.shape_str(m.shape)}"
        _checks.check_value(m.dim() <= 4, op, "attn_mask", expected, got)
        for size, want in zip(reversed(m.shape), reversed(full)):
            _checks.check_value((size == 1) | (size == want), op, "attn_mask", expected, got)
        _checks.check_value(not is_causal, op, "is_causal", "False when attn_mask is given",
                            "True together with an attn_mask")
    _checks.check_value(scale == scale and abs(scale) != float("inf") and scale > 0.0, op, "scale",
                        "a finite number > 0", _checks.number_str(scale))
    _checks.check_probability(op, "dropout_p", dropout_p)
    _checks.check_seed(op, "seed", seed, dropout_p > 0.0, queries)


@torch.library.register_fake("pypeft::token_subset_attention")
def _token_subset_attention_fake(query, key, value, attn_mask, scale, is_causal, dropout_p, seed,
                                 positions):
    _checks.check_dim(_OP, "query", query, 4)
    _check_args(_OP, "query", query, query.shape[2], key, value, attn_mask, scale, is_causal, dropout_p, seed)
    _checks.check_positions(_OP, positions, "query", query, 0, 2)
    B, Hq, T, D = query.shape
    out = query.new_empty((B, T, Hq, value.shape[3])).transpose(1, 2)
    query_rows = query.new_empty((B, Hq, positions.shape[1], D))
    return out, query_rows


@torch.library.register_fake("pypeft::token_subset_attention_backward")
def _token_subset_attention_backward_fake(grad_out, query_rows, key, value, attn_mask, scale,
                                          is_causal, dropout_p, seed, positions, output_mask):
    op = _BACKWARD_OP
    _checks.check_dim(op, "grad_out", grad_out, 4)
    _check_args(op, "query_rows", query_rows, grad_out.shape[2], key, value, attn_mask, scale, is_causal,
                dropout_p, seed)
    _checks.check_positions(op, positions, "grad_out", grad_out, 0, 2)
    B, Hq, _, D = query_rows.shape
    _checks.check_size(op, "grad_out", grad_out, 0, B, "batch B, from query_rows")
    _checks.check_size(op, "grad_out", grad_out, 1, Hq, "query heads Hq, from query_rows")
    _checks.check_size(op, "grad_out", grad_out, 3, value.shape[3], "value dim Dv, from value")
    _checks.check_like(op, "grad_out", grad_out, "query_rows", query_rows)
    _checks.check_size(op, "query_rows", query_rows, 2, positions.shape[1], "selected tokens k, from positions [B, k]")
    need_query, need_key, need_value = output_mask
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
