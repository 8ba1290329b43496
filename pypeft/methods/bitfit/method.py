"""BitFit's place in pypeft: BitFitLayers at the modules whose biases train
(inside a LoRA/VeRA layer where one adapts the module), merging by copying
the bias in, and a format of pypeft's own (format.py). It composes with LoRA,
VeRA and TokenTune, not with READ (which runs the backbone without autograd,
so no bias in it could train)."""

from __future__ import annotations

import torch
from torch import nn

from pypeft.methods.bitfit import format as bitfit_format
from pypeft.methods.bitfit.config import WHERE, BitFitConfig
from pypeft.methods.bitfit.layer import BitFitLayer
from pypeft.methods.bitfit.targets import find_bias_targets
from pypeft.registry import Method, Plan
from pypeft.state import PatchState
from pypeft.targets import find_modules_to_save


class BitFitMethod(Method):
    name = "bitfit"
    config_class = BitFitConfig
    composition_note = "READ runs the backbone without autograd, so the biases inside it cannot train"

    def composes_with(self, other: str) -> bool:
        return other != "read"

    # --- patching ------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config: BitFitConfig) -> Plan:
        to_save = find_modules_to_save(model, config.modules_to_save, owner=WHERE)
        targets = find_bias_targets(model, config, to_save)
        return Plan(self, config, [t.name for t in targets], to_save, extra=targets)

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        for target in plan.extra:
            layer = state.wrap(model, target.path, BitFitLayer)
            layer.add_adapter(plan.adapter_name, target.shape)

    # --- disk ----------------------------------------------------------------------
    def recognises(self, fields: dict) -> bool:
        return bitfit_format.is_bitfit_config(fields)

    def format_name(self) -> str:
        return "pypeft's BitFit"

    def to_disk(self, model: nn.Module, state: PatchState, name: str):
        record = state.adapters[name]
        fields = bitfit_format.config_json(model, record.config, record.layers)
        return fields, bitfit_format.layer_tensors(model, record.layers, name)

    def config_from_disk(self, fields: dict, adapter_name: str) -> BitFitConfig:
        return bitfit_format.config_from_json(fields, adapter_name)

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        return bitfit_format.expected_shapes(plan.extra, fields)

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        trained = bitfit_format.layer_tensors(model, plan.targets, plan.adapter_name)
        for key, value in trained.items():
            value.copy_(tensors[key])
