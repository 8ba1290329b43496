"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update.

Conventions are PEFT's, so adapters can move between pypeft and `peft`:
A ([r, in]) is Kaiming-uniform with a=√5, B ([out, r]) starts at zero (the
patched layer starts equal to the base), the update is scaled by alpha / r, or
alpha / √r with rsLoRA, and adapters of a bfloat16/float16 layer are kept in
float32 (PEFT's autocast_adapter_dtype default).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pypeft.ops.lora_linear import lora_linear


def _check_lora_options(r, alpha, dropout):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoraLinear: argument 'r': expected an int >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"LoraLinear: argument 'alpha': expected a finite number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoraLinear: argument 'dropout': expected a probability in [0, 1), got {dropout!r}")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraLinear(nn.Module):
    """`base` (kept frozen) plus scaling · B A dropout(x), run as one native op.

    Args:
        base: the nn.Linear to adapt; its parameters are frozen.
        r: rank (>= 1). alpha: LoRA alpha. dropout: on the adapter's input.
        rslora: scale by alpha / √r instead of alpha / r.
        adapter_dtype: dtype of A and B; default: the base weight's, or float32
            when that is bfloat16/float16.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoraLinear: argument 'base': expected torch.nn.Linear, got {type(base).__name__}")
        _check_lora_options(r, alpha, dropout)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r = r
        self.alpha = alpha
        self.dropout = float(dropout)
        self.rslora = rslora
        self.scaling = lora_scaling(r, alpha, rslora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        # A fresh mask every step; the seed is a tensor so that torch.compile
        # keeps one graph while it changes.
        seed = torch.randint(0, 2**62, (), device=x.device) if p > 0.0 else None
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                           self.scaling, p, seed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.rslora}")
