"""Linear-like layers: torch.nn.Linear, and transformers' Conv1D (GPT-2 and
relatives), which computes the same x Wᵀ + b but stores W transposed, as
[in_features, out_features]."""

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


def is_linear_like(module: nn.Module) -> bool:
    module = underlying(module)
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as [in, out] (Conv1D)."""
    return bool(Conv1D) and isinstance(underlying(module), Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], as a view (no copy) for Conv1D."""
    return module.weight.t() if is_transposed(module) else module.weight
