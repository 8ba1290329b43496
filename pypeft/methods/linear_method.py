"""The shared half of methods whose adapters live in linear layers
(AdaptedLinear subclasses: LoRA, VeRA) and are stored in PEFT's format.

Patching: targets by PEFT's rules (pypeft/targets.py), one method per layer,
each target wrapped in the method's layer class, the adapter added to it.
On disk: adapter_config.json with PEFT's fields and
adapter_model.safetensors with PEFT's keys, a layer's tensors under
f"base_model.model.<layer>.<suffix>". A subclass says what its config fields
are (config_fields / config_from_peft, and the field kinds peft_fields.py
checks), what a layer holds (layer_tensors / layer_shapes) and what the
whole model holds besides (model_tensors).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pypeft.methods.adapted_linear import AdaptedLinear
from pypeft.methods.config_checks import check_runs_natively
from pypeft.methods.peft_fields import Neutral, check_fields
from pypeft.models import task_type
from pypeft.models.linear import is_transposed
from pypeft.registry import Method, Plan
from pypeft.state import PatchState
from pypeft.targets import base_dims, base_module, find_modules_to_save, find_targets, modules_to_save_keys

PREFIX = "base_model.model."  # PEFT's prefix for keys of the wrapped model

# Fields every PEFT-format linear method reads or can ignore.
COMMON_USED = {"r", "target_modules", "exclude_modules", "modules_to_save",
               # Conv1D vs nn.Linear layout: pypeft reads it off the layer itself.
               "fan_in_fan_out"}
COMMON_NEUTRAL: Neutral = {
    "bias": (lambda v: v in (None, "none"), "'none'"),
    "layers_to_transform": (lambda v: v is None, "None"),
    "layers_pattern": (lambda v: v is None or v == [], "None"),
}


class LinearAdapterMethod(Method):
    layer_class: ClassVar[type[AdaptedLinear]]
    peft_type: ClassVar[str]
    used_fields: ClassVar[set[str]] = set()
    init_only_fields: ClassVar[set[str]] = set()
    neutral_fields: ClassVar[Neutral] = {}

    # --- patching --------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config) -> Plan:
        to_save = find_modules_to_save(model, config.modules_to_save, owner=f"pypeft.patch(method={self.name!r})")
        targets = find_targets(model, config.target_modules, self.name, to_save,
                               getattr(config, "exclude_modules", None))
        owner = f"pypeft.patch(method={self.name!r})"
        check_runs_natively(owner, (base_module(model.get_submodule(n)).weight for n in targets))
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, AdaptedLinear) and not isinstance(module, self.layer_class):
                raise ValueError(f"pypeft.patch(method={self.name!r}): layer {name!r} holds {module.method} "
                                 "adapters; a layer takes adapters of one method (choose other target_modules)")
        return Plan(self, config, targets, to_save, self.plan_extra(model, state, config, targets))

    def plan_extra(self, model: nn.Module, state: PatchState | None, config, targets: list[str]):
        """What else the method resolves before changing anything."""
        return None

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        for name in plan.targets:
            self.add_to_layer(state.wrap(model, name, self.layer_class), state, plan)

    def add_to_layer(self, layer: AdaptedLinear, state: PatchState, plan: Plan) -> None:
        raise NotImplementedError

    # --- disk ---------------------------------------------------------------------------
    def recognises(self, fields: dict) -> bool:
        return fields.get("peft_type") == self.peft_type

    def format_name(self) -> str:
        return f"PEFT's {self.peft_type}"

    def format_hint(self) -> str:
        return f"peft's (peft_type {self.peft_type!r})"

    def to_disk(self, model: nn.Module, state: PatchState, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        record = state.adapters[name]
        config = record.config
        fields = {
            "peft_type": self.peft_type,
            "task_type": task_type(model),
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            # The resolved module names: PEFT's suffix matching selects exactly these.
            "target_modules": record.layers,
            # The keys, not the names they resolved to: peft resolves them as pypeft does.
            "modules_to_save": modules_to_save_keys(model, config.modules_to_save),
            "fan_in_fan_out": any(is_transposed(model.get_submodule(n).base_layer) for n in record.layers),
            "bias": "none",
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
            **self.config_fields(config),
        }
        tensors = dict(self.model_tensors(state, config))
        for layer_name in record.layers:
            for suffix, value in self.layer_tensors(model.get_submodule(layer_name), name).items():
                tensors[f"{PREFIX}{layer_name}.{suffix}"] = value
        return fields, tensors

    def config_from_disk(self, fields: dict, adapter_name: str):
        check_fields(fields, self.peft_type, COMMON_USED | self.used_fields, self.init_only_fields,
                     {**COMMON_NEUTRAL, **self.neutral_fields})
        config = self.config_from_peft(fields, adapter_name)
        config.modules_to_save = fields.get("modules_to_save") or []  # peft's list, resolved as peft does
        return config

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        shapes = {}
        for name in plan.targets:
            for suffix, shape in self.layer_shapes(plan.config, *base_dims(model, name)).items():
                shapes[f"{PREFIX}{name}.{suffix}"] = shape
        return shapes

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        for name in plan.targets:
            for suffix, value in self.layer_tensors(model.get_submodule(name), plan.adapter_name).items():
                value.copy_(tensors[f"{PREFIX}{name}.{suffix}"])

    # --- what a subclass says ----------------------------------------------------------
    def config_fields(self, config) -> dict:
        raise NotImplementedError

    def config_from_peft(self, fields: dict, adapter_name: str):
        raise NotImplementedError

    def layer_tensors(self, layer: AdaptedLinear, adapter: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer_shapes(self, config, n_in: int, n_out: int) -> dict[str, tuple]:
        raise NotImplementedError

    def model_tensors(self, state: PatchState, config) -> dict[str, torch.Tensor]:
        """Tensors of the whole model (not of a layer) the adapter saves."""
        return {}
