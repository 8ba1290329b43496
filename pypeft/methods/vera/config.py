"""VeraConfig: what pypeft.patch(model, method="vera", ...) takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from pypeft.methods.config_checks import TargetModules, check_common, check_dropout, check_finite, check_rank


@dataclass
class VeraConfig:
    """What `pypeft.patch(model, method="vera", ...)` takes.

    r: the shared matrices' rank (VeRA's r is much larger than LoRA's: its
    trainable count grows only by 1 per layer per unit of r). projection_seed:
    PEFT's projection_prng_key. save_projection: write A and B with the
    adapter (else a loader regenerates them from the seed).
    target_modules / modules_to_save: as LoraConfig.
    """

    r: int = 256
    target_modules: TargetModules = None
    projection_seed: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    save_projection: bool = True
    adapter_name: str = "default"
    modules_to_save: list[str] | None = field(default=None)

    method = "vera"

    def __post_init__(self):
        check_rank("VeraConfig", self.r)
        check_finite("VeraConfig", "d_initial", self.d_initial)
        check_dropout("VeraConfig", self.dropout)
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int) \
                or not 0 <= self.projection_seed < 2**64:
            raise ValueError("VeraConfig: argument 'projection_seed': expected an int in [0, 2**64), "
                             f"got {self.projection_seed!r}")
        if not isinstance(self.save_projection, bool):
            raise ValueError(f"VeraConfig: argument 'save_projection': expected a bool, got {self.save_projection!r}")
        check_common("VeraConfig", self)
