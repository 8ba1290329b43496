"""Checks of the options every method's config shares (names, targets,
modules_to_save, rank, dropout), so each config raises the same clear errors."""

from __future__ import annotations

import math
from typing import Union

import torch

TargetModules = Union[None, str, list, tuple, set]


def check_rank(owner: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{owner}: argument 'r': expected an int >= 1, got {r!r}")


def check_finite(owner: str, argument: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: argument '{argument}': expected a finite number, got {value!r}")


def check_dropout(owner: str, dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: argument 'dropout': expected a probability in [0, 1), got {dropout!r}")


def check_common(owner: str, config) -> None:
    """adapter_name, target_modules and modules_to_save of a method config."""
    if not isinstance(config.adapter_name, str) or not config.adapter_name.isidentifier():
        raise ValueError(f"{owner}: argument 'adapter_name': expected a name made of letters, digits "
                         f"and underscores, got {config.adapter_name!r}")
    if config.adapter_name == "base":
        raise ValueError(f"{owner}: argument 'adapter_name': 'base' names the unadapted model "
                         "(pypeft.mixed_batch); choose another name")
    for argument in ("target_modules", "exclude_modules"):
        targets = getattr(config, argument, None)
        if isinstance(targets, (list, tuple, set)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"{owner}: argument '{argument}': expected a non-empty list of module "
                                 f"names, got {targets!r}")
        elif targets is not None and not isinstance(targets, str):
            raise ValueError(f"{owner}: argument '{argument}': expected None, a list of names or a regex"
                             f"{' or all-linear' if argument == 'target_modules' else ''}, got "
                             f"{type(targets).__name__}")
    to_save = config.modules_to_save
    if to_save is not None and (isinstance(to_save, str) or not all(isinstance(m, str) for m in to_save)):
        raise ValueError(f"{owner}: argument 'modules_to_save': expected a list of module names, "
                         f"got {to_save!r}")


def check_runs_natively(owner: str, weights) -> None:
    """pypeft's CPU kernels take float32, float64 and bfloat16; float16 runs on
    CUDA only. Refuse a float16 CPU model at patch time rather than on every
    forward (patch on the GPU, or move the model there first)."""
    for weight in weights:
        if weight.dtype == torch.float16 and weight.device.type == "cpu":
            raise ValueError(f"{owner}: argument 'model': its weights are float16 on the CPU, where pypeft's "
                             "kernels run float32, float64 and bfloat16 only (float16 runs on CUDA); move the model "
                             "to a GPU first (model.cuda()), or use model.bfloat16() / model.float() on the CPU")
