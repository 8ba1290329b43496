"""BitFit adapters on disk. PEFT has no BitFit format, so pypeft writes its
own, as for READ, with PEFT's file names and io.py's checks and atomic
writes: adapter_config.json says `"pypeft_method": "bitfit"`, the resolved
module names (target_modules, matched exactly on load), which of them had no
bias of their own (added_biases: checked on load, since a bias trained from
zero means something else in a model that has one) and the modules_to_save
keys; adapter_model.safetensors holds each trained bias under
"bitfit.<module name>.bias" and the heads trained in full under PEFT's
"base_model.model.<module>.<key>", as the other methods do.
"""

from __future__ import annotations

import torch
from torch import nn

from pypeft.methods.bitfit.config import BitFitConfig
from pypeft.methods.bitfit.targets import BiasTarget, bitfit_layer
from pypeft.methods.peft_fields import METHOD_KEY
from pypeft.models import task_type
from pypeft.targets import modules_to_save_keys

TENSOR_PREFIX = "bitfit."


def is_bitfit_config(fields: dict) -> bool:
    return fields.get(METHOD_KEY) == "bitfit"


def tensor_key(module_name: str) -> str:
    return f"{TENSOR_PREFIX}{module_name}.bias"


def config_json(model: nn.Module, config: BitFitConfig, layers: list[str]) -> dict:
    return {
        METHOD_KEY: "bitfit",
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "target_modules": list(layers),
        "added_biases": [n for n in layers if bitfit_layer(model, n).adds_bias],
        "add_missing_biases": config.add_missing_biases,
        "modules_to_save": modules_to_save_keys(model, config.modules_to_save),
    }


def config_from_json(fields: dict, adapter_name: str) -> BitFitConfig:
    targets = fields.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"field 'target_modules': expected a non-empty list of module names, got {targets!r}")
    return BitFitConfig(target_modules=targets, add_missing_biases=bool(fields.get("add_missing_biases", False)),
                        modules_to_save=fields.get("modules_to_save") or [], adapter_name=adapter_name)


def layer_tensors(model: nn.Module, layers: list[str], adapter_name: str) -> dict[str, torch.Tensor]:
    return {tensor_key(n): bitfit_layer(model, n).bitfit_bias[adapter_name] for n in layers}


def expected_shapes(targets: list[BiasTarget], fields: dict) -> dict[str, tuple]:
    saved = fields.get("added_biases") or []
    if not isinstance(saved, list):
        raise ValueError(f"field 'added_biases': expected a list of module names, got {saved!r}")
    here = {t.name for t in targets if t.added}
    for name in sorted(here ^ set(saved)):
        had, has = ("no bias", "one") if name in saved else ("its own bias", "none")
        raise ValueError(f"module {name!r} had {had} where the adapter was trained but has {has} in this model; "
                         "the adapter was trained for another model")
    return {tensor_key(t.name): t.shape for t in targets}
