"""TEMPORARY eager stand-in for pypeft::bottleneck_adapter (being built as a native op on branch
op-bottleneck); same signature, replaced on merge."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu, "identity": lambda t: t}


def bottleneck_adapter(z, residual, w_down, b_down, w_up, b_up, scale: float, activation: str,
                       dropout_p: float = 0.0, seed=None):
    up = F.linear(_ACT[activation](F.linear(z, w_down, b_down)), w_up, b_up) * scale
    if dropout_p > 0:
        up = F.dropout(up, dropout_p, True)
    return up if residual is None else residual + up
