"""Linear-like layers: torch.nn.Linear, transformers' Conv1D (GPT-2 and
relatives), which computes the same x Wᵀ + b but stores W transposed, as
[in_features, out_features], and quantised frozen linear layers
(pypeft.quant.NF4Linear).

A quantised layer says so with a class attribute `quantized_linear = True` and
has in_features, out_features, bias, compute_dtype (what its products run in),
`op_operands()` -> (weight, keyword arguments): what pypeft's linear ops take
in place of a dense [out, in] weight (NF4 codes and `weight_absmax=...,
weight_blocksize=...`), `dequantized_weight(dtype)` ([out, in]; by default in
`weight_dtype`, the dtype it was quantised from), `quantize_(w)` (store new
weights), and `storage_snapshot()` / `restore_storage(snapshot)` (an exact
copy of what it stores, and back). Methods reach a base layer only through
the functions here, so none of them names a storage format.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from pypeft.layer import underlying

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

LinearLike = Union[nn.Linear, "Conv1D"]


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer stores its frozen weight quantised (e.g. NF4)."""
    return bool(getattr(underlying(module), "quantized_linear", False))


def is_linear_like(module: nn.Module) -> bool:
    module = underlying(module)
    return (isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))
            or is_quantized(module))


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as [in, out] (Conv1D)."""
    return bool(Conv1D) and isinstance(underlying(module), Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_quantized(module):
        module = underlying(module)
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], as a view (no copy) for Conv1D."""
    return module.weight.t() if is_transposed(module) else module.weight


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's products run in: its weight's, or a quantised layer's compute dtype."""
    module = underlying(module)
    return module.compute_dtype if is_quantized(module) else module.weight.dtype


def frozen_operands(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(weight, bias, keyword arguments) for pypeft's linear ops over the frozen
    layer, for activations x in its compute dtype: the dense [out, in] weight
    (a view for Conv1D) and no keywords, or a quantised layer's operands. The
    bias is cast to x's dtype where it differs (differentiably: BitFit trains it)."""
    bias = module.bias  # a stand-in's (BitFit's active bias), not necessarily the underlying layer's
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if is_quantized(module):
        weight, extra = underlying(module).op_operands()
        return weight, bias, extra
    return weight_out_in(module), bias, {}
