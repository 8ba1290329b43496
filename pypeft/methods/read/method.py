"""READ's place in pypeft: one ReadRecord per model (hooks on the final
stack's layers, the stacks' forwards under no_grad, the ReadAdapters module
holding every READ network) as its per-model state; each adapter is a
network in it. READ does not compose with methods that train inside the
backbone, cannot merge, and has a format of pypeft's own (format.py)."""

from __future__ import annotations

import torch
from torch import nn

from pypeft.methods.read import format as read_format
from pypeft.methods.read import network as read
from pypeft.methods.read.config import ReadConfig
from pypeft.registry import Method, Plan
from pypeft.state import PatchState


class ReadMethod(Method):
    name = "read"
    config_class = ReadConfig
    can_merge = False
    composition_note = "READ runs the backbone without autograd, so methods that train inside it cannot join it"

    def composes_with(self, other: str) -> bool:
        # READ runs the backbone without autograd: nothing that trains inside it.
        return other == self.name

    def record(self, state: PatchState | None) -> read.ReadRecord | None:
        return None if state is None else state.method_states.get(self.name)

    # --- patching ------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config: ReadConfig) -> Plan:
        from pypeft.targets import find_modules_to_save

        to_save = find_modules_to_save(model, config.modules_to_save, owner="pypeft.patch(method='read')")
        record = self.record(state)
        stack = record.stack if record is not None else read.final_stack_of(model)
        layers = config.layer_indices(len(stack.layers))
        return Plan(self, config, [stack.name], to_save, extra=(stack, layers))

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        stack, layers = plan.extra
        record = self.record(state)
        if record is None:
            record = state.method_states[self.name] = read.attach(model, stack)
            record.adapters.bind(state.context)
        like = next(stack.module.parameters())
        record.adapters.add_adapter(plan.adapter_name, plan.config, layers, read.network_dtype(model), like.device)

    def detach(self, model: nn.Module, state: PatchState) -> None:
        read.detach(model, state.method_states.pop(self.name))

    # --- disk ----------------------------------------------------------------------
    def recognises(self, fields: dict) -> bool:
        return read_format.is_read_config(fields)

    def format_name(self) -> str:
        return "pypeft's READ"

    def format_hint(self) -> str:
        return "pypeft's READ (pypeft_method 'read')"

    def to_disk(self, model: nn.Module, state: PatchState, name: str):
        record = state.adapters[name]
        fields = read_format.config_json(model, self.record(state), record.config)
        return fields, read_format.network_tensors(self.record(state), name)

    def config_from_disk(self, fields: dict, adapter_name: str) -> ReadConfig:
        return read_format.config_from_json(fields, adapter_name)

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        stack, _ = plan.extra
        here = (stack.name, len(stack.layers), read.width_of(model, stack))
        saved = (fields.get("stack"), fields.get("stack_layers"), fields.get("width"))
        if saved != here:
            raise ValueError(f"saved for a stack (name, layers, width) = {saved}, but this model's is {here}")
        return read_format.network_shapes(plan.config, here[2])

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        network = self.record(state).adapters.networks[plan.adapter_name]
        prefix = read_format.NETWORK_PREFIX
        network.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
