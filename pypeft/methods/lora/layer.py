"""LoRA (Hu et al., 2021): a frozen linear layer plus trainable low-rank updates.

Conventions are PEFT's, so adapters move between pypeft and `peft` both ways:
A ([r, in]) is Kaiming-uniform with a=√5, B ([out, r]) starts at zero (the
patched layer starts equal to the base), the update is scaled by alpha / r, or
alpha / √r with rsLoRA, and adapters of a bfloat16/float16 layer are kept in
float32 (PEFT's autocast_adapter_dtype default). A layer holds any number of
named adapters; one (or none) is active.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pypeft.methods.adapted_linear import AdaptedLinear, default_adapter_dtype
from pypeft.methods.lora.config import check_lora_options, lora_scaling
from pypeft.models.linear import compute_dtype, frozen_operands
from pypeft.ops.lora_linear import lora_linear
from pypeft.ops.mixed_linear import lora_linear_mixed
from pypeft.ops.token_subset_linear import token_subset_lora_linear


class LoraLinear(AdaptedLinear):
    """A frozen linear layer (nn.Linear or transformers' Conv1D) plus named
    LoRA adapters; the active one runs with the base in one native op.

    `LoraLinear(base, r, alpha, dropout=0.0, rslora=False)` makes a layer with
    one adapter named "default"; `add_adapter` adds more.
    """

    adapter_dicts = ("lora_A", "lora_B")
    method = "lora"

    def __init__(self, base: nn.Module, r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                 adapter_name: str = "default"):
        super().__init__(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.r: dict[str, int] = {}
        if r is not None:
            self.add_adapter(adapter_name, r, alpha if alpha is not None else r, dropout, rslora, adapter_dtype)
            self.active_adapter = adapter_name

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    adapter_dtype: torch.dtype | None = None) -> None:
        check_lora_options("LoraLinear", r, alpha, dropout)
        self._check_new_name(name)
        factory = {"device": self.base_layer.weight.device,
                   "dtype": adapter_dtype or default_adapter_dtype(compute_dtype(self.base_layer))}
        a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = a
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        self.dropout[name] = float(dropout)

    def _forget(self, name: str) -> None:
        del self.r[name], self.scaling[name], self.dropout[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale · B A as [out, in], in float32 (or float64)."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        return (b.to(dtype) @ a.to(dtype)) * self.scaling[name]

    def _adapter_forward(self, x: torch.Tensor, name: str, positions: torch.Tensor | None) -> torch.Tensor:
        p = self.dropout[name] if self.training else 0.0
        weight, bias, base = frozen_operands(self.base_layer, x)
        args = (x, weight, bias, self.lora_A[name], self.lora_B[name], self.scaling[name], p, self.dropout_seed(p, x))
        return lora_linear(*args, **base) if positions is None else token_subset_lora_linear(*args, positions, **base)

    def _mixed_forward(self, x: torch.Tensor, names: list[str], rows: list[int]) -> torch.Tensor:
        weight, bias, base = frozen_operands(self.base_layer, x)
        return lora_linear_mixed(x, weight, bias, [self.lora_A[n] for n in names], [self.lora_B[n] for n in names],
                                 [self.scaling[n] for n in names], rows, **base)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, scaling={self.scaling[n]:g}, dropout={self.dropout[n]})"
                             for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapter!r}")
