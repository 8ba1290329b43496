"""LoraConfig: what pypeft.patch(model, method="lora", ...) takes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pypeft.methods.config_checks import TargetModules, check_common, check_dropout, check_finite, check_rank


def check_lora_options(owner: str, r, alpha, dropout):
    check_rank(owner, r)
    check_finite(owner, "alpha", alpha)
    check_dropout(owner, dropout)


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass
class LoraConfig:
    """What `pypeft.patch(model, method="lora", ...)` takes.

    target_modules: None (the model family's default, e.g. query/value for
    BERT), a list of module-name suffixes (PEFT's matching), a regular
    expression matched against whole module names, or "all-linear" (every
    linear layer but the output head). exclude_modules: the same forms,
    removed from what target_modules selects. modules_to_save: modules trained
    in full beside the adapter; each entry selects every module whose name ends
    with it, as in peft (default: a sequence classifier's "classifier" /
    "score").
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: TargetModules = None
    rslora: bool = False
    adapter_name: str = "default"
    modules_to_save: list[str] | None = field(default=None)
    exclude_modules: TargetModules = None

    method = "lora"

    def __post_init__(self):
        check_lora_options("LoraConfig", self.r, self.alpha, self.dropout)
        check_common("LoraConfig", self)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)
