"""TokenTune written the paper's way, in eager PyTorch, for a BERT classifier:
the selected tokens run with autograd, the others under no_grad, layer by
layer; selected queries attend to the keys and values of every token. The
baseline pypeft's native TokenTune must beat (benchmarks/bench_tokentune.py).

It reuses the model's own modules, so both run the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def _unselected(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    keep = torch.ones(positions.shape[0], tokens, dtype=torch.bool, device=positions.device)
    keep.scatter_(1, positions, False)
    return keep.nonzero()[:, 1].view(positions.shape[0], tokens - positions.shape[1])


def _heads(x: torch.Tensor, linear, num_heads: int) -> torch.Tensor:
    B, n, _ = x.shape
    return linear(x).view(B, n, num_heads, -1).transpose(1, 2)


def _layer(layer, h_sel: torch.Tensor, h_rest: torch.Tensor, training: bool):
    """One BertLayer on both streams; returns (h_sel, h_rest)."""
    att = layer.attention.self
    nh = att.num_attention_heads
    q_sel, k_sel, v_sel = (_heads(h_sel, lin, nh) for lin in (att.query, att.key, att.value))
    with torch.no_grad():
        q_rest, k_rest, v_rest = (_heads(h_rest, lin, nh) for lin in (att.query, att.key, att.value))
    keys, values = torch.cat([k_sel, k_rest], 2), torch.cat([v_sel, v_rest], 2)
    p = att.dropout.p if training else 0.0
    ctx_sel = F.scaled_dot_product_attention(q_sel, keys, values, dropout_p=p)
    with torch.no_grad():
        ctx_rest = F.scaled_dot_product_attention(q_rest, keys, values, dropout_p=p)

    def finish(ctx, h):
        ctx = ctx.transpose(1, 2).flatten(2)
        a = layer.attention.output(ctx, h)
        return layer.output(layer.intermediate(a), a)

    h_sel = finish(ctx_sel, h_sel)
    with torch.no_grad():
        h_rest = finish(ctx_rest, h_rest)
    return h_sel, h_rest


def two_stream_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The classification loss of BertForSequenceClassification on an unpadded
    batch, backpropagating through `positions` ([B, k], sorted, holding the
    first token) only."""
    bert = model.bert
    B, T = input_ids.shape
    rest = _unselected(positions, T)
    h_sel = bert.embeddings(input_ids=input_ids.gather(1, positions), position_ids=positions,
                            token_type_ids=torch.zeros_like(positions))
    with torch.no_grad():
        h_rest = bert.embeddings(input_ids=input_ids.gather(1, rest), position_ids=rest,
                                 token_type_ids=torch.zeros_like(rest))
    for layer in bert.encoder.layer:
        h_sel, h_rest = _layer(layer, h_sel, h_rest, model.training)
    first = h_sel[:, 0]  # positions are sorted and hold token 0
    logits = model.classifier(model.dropout(bert.pooler.activation(bert.pooler.dense(first))))
    return F.cross_entropy(logits, labels)
