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
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from pypeft.models.linear import is_linear_like, is_transposed, linear_dims, weight_out_in
from pypeft.ops.lora_linear import lora_linear

TargetModules = Union[None, str, list, tuple, set]


def _check_lora_options(owner: str, r, alpha, dropout):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{owner}: argument 'r': expected an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{owner}: argument 'alpha': expected a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: argument 'dropout': expected a probability in [0, 1), got {dropout!r}")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass
class LoraConfig:
    """What `pypeft.patch(model, method="lora", ...)` takes.

    target_modules: None (the model family's default, e.g. query/value for
    BERT), a list of module-name suffixes (PEFT's matching), a regular
    expression matched against whole module names, or "all-linear" (every
    linear layer but the output head). modules_to_save: modules trained in
    full beside the adapter (default: the task head of a sequence classifier).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: TargetModules = None
    rslora: bool = False
    adapter_name: str = "default"
    modules_to_save: list[str] | None = field(default=None)

    method = "lora"

    def __post_init__(self):
        _check_lora_options("LoraConfig", self.r, self.alpha, self.dropout)
        if not isinstance(self.adapter_name, str) or not self.adapter_name.isidentifier():
            raise ValueError("LoraConfig: argument 'adapter_name': expected a name made of letters, digits "
                             f"and underscores, got {self.adapter_name!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError("LoraConfig: argument 'target_modules': expected a non-empty list of module "
                                 f"names, got {self.target_modules!r}")
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError("LoraConfig: argument 'target_modules': expected None, a list of names, a regex "
                             f"or 'all-linear', got {type(self.target_modules).__name__}")
        if self.modules_to_save is not None and (
                isinstance(self.modules_to_save, str) or
                not all(isinstance(m, str) for m in self.modules_to_save)):
            raise ValueError("LoraConfig: argument 'modules_to_save': expected a list of module names, "
                             f"got {self.modules_to_save!r}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)


class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear or transformers' Conv1D) plus named
    LoRA adapters; the active one runs with the base in one native op.

    `LoraLinear(base, r, alpha, dropout=0.0, rslora=False)` makes a layer with
    one adapter named "default"; `add_adapter` adds more.
    """

    def __init__(self, base: nn.Module, r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                 adapter_name: str = "default"):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError("LoraLinear: argument 'base': expected torch.nn.Linear or transformers Conv1D, "
                            f"got {type(base).__name__}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.active_adapter: str | None = None
        self.disabled = False  # set by pypeft.disabled(): the base alone
        self.merged: list[str] = []  # adapters folded into base_layer's weight
        if r is not None:
            self.add_adapter(adapter_name, r, alpha if alpha is not None else r, dropout, rslora, adapter_dtype)
            self.active_adapter = adapter_name

    @property
    def in_features(self) -> int:
        return linear_dims(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.base_layer)[1]

    # Model code reads these off the layer it calls (e.g. T5 checks `wo.weight.dtype`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    adapter_dtype: torch.dtype | None = None) -> None:
        _check_lora_options("LoraLinear", r, alpha, dropout)
        if name in self.lora_A:
            raise ValueError(f"LoraLinear: adapter {name!r} exists already (adapters: {sorted(self.lora_A)})")
        weight = self.base_layer.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = a
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        self.dropout[name] = float(dropout)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name]
        del self.r[name], self.scaling[name], self.dropout[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale · B A as [out, in], in float32 (or float64)."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        return (b.to(dtype) @ a.to(dtype)) * self.scaling[name]

    @torch.no_grad()
    def merge(self) -> None:
        name = self.active_adapter
        if name is None or name not in self.lora_A or name in self.merged:
            return
        self._add_to_weight(self.delta_weight(name), +1)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            self._add_to_weight(self.delta_weight(self.merged.pop()), -1)

    def _add_to_weight(self, delta: torch.Tensor, sign: int) -> None:
        w = self.base_layer.weight
        d = delta.t() if is_transposed(self.base_layer) else delta
        w.copy_((w.to(d.dtype) + sign * d).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled or self.merged or name is None or name not in self.lora_A:
            return self.base_layer(x)
        p = self.dropout[name] if self.training else 0.0
        # A fresh mask every step; the seed is a tensor so that torch.compile
        # keeps one graph while it changes.
        seed = torch.randint(0, 2**62, (), device=x.device) if p > 0.0 else None
        return lora_linear(x, weight_out_in(self.base_layer), self.base_layer.bias, self.lora_A[name],
                           self.lora_B[name], self.scaling[name], p, seed)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, scaling={self.scaling[n]:g}, dropout={self.dropout[n]})"
                             for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapter!r}")
