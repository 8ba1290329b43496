"""TEMPORARY eager stand-in for pypeft::adapter_fusion (being built as a native op on branch op-fusion);
same math, replaced on merge."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu, "identity": lambda t: t}


def adapter_fusion(z, query, residual, w_down, b_down, w_up, b_up, scales, activation, w_query, b_query,
                   w_key, b_key, w_value, temperature: float, dropout_p: float = 0.0, seed=None):
    act = _ACT[activation]
    ups = torch.stack([F.linear(act(F.linear(z, w_down[i], b_down[i])), w_up[i], b_up[i]) * float(scales[i])
                       for i in range(w_down.shape[0])], dim=-2)                       # [..., N, d]
    q = F.linear(query, w_query, b_query)
    k = F.linear(ups, w_key, b_key)
    scores = (k @ q.unsqueeze(-1)).squeeze(-1)                                           # [..., N]
    if dropout_p > 0:
        scores = F.dropout(scores, dropout_p, True)
    p = torch.softmax(scores / temperature, dim=-1)
    c = (p.unsqueeze(-1) * ups).sum(-2)
    out = F.linear(c, w_value) if w_value is not None else c
    return out if residual is None else residual + out
