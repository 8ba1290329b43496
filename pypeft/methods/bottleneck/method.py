"""Bottleneck adapters' place in pypeft: the sites they sit at (one per
sublayer exit of the chosen layers), the hooks that run them, and the per-model
record (BottleneckRecord) that unpatch() undoes. They cannot merge (the
bottleneck is nonlinear) and compose with LoRA/VeRA, not with READ."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pypeft.methods.bottleneck import library_format as lib
from pypeft.methods.bottleneck.config import OWNER, BottleneckConfig
from pypeft.methods.bottleneck.site import BottleneckSite, ExitHook, ResidualHook
from pypeft.models.sublayers import SublayerExit, sublayer_exits
from pypeft.registry import Method, Plan
from pypeft.state import PatchState

CONTAINER = "pypeft_bottleneck"  # the child of a transformer layer holding its sites


def site_name(exit: SublayerExit) -> str:
    return f"{exit.layer_name}.{CONTAINER}.{exit.sublayer}"


@dataclass
class Placement:
    """A plan's resolved facts: the exits that get the adapter, their
    bottleneck sizes, the model width; on load, the file's key for each
    (site, parameter)."""

    exits: list[SublayerExit]
    sizes: dict[str, int]
    hidden: int
    file_keys: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class BottleneckRecord:
    """Per model: the exits that have a site (site name -> exit). The hooks
    themselves live in the modules (found again by their type, so a deepcopy
    or an unpickled model, whose modules carry copies, needs no handles)."""

    exits: dict[str, SublayerExit] = field(default_factory=dict)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def remove_hooks(modules) -> None:
    """Take this method's hooks off `modules`."""
    for module in modules:
        ours = [key for d in ("_forward_hooks", "_forward_pre_hooks")
                for key, hook in getattr(module, d).items() if isinstance(hook, (ExitHook, ResidualHook))]
        for key in ours:
            for d in _HOOK_DICTS:
                getattr(module, d, {}).pop(key, None)


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{OWNER}: argument 'model': its config has no integer hidden_size")
    return size


def layer_dtype(model: nn.Module, exit: SublayerExit) -> tuple[torch.dtype, torch.device]:
    # The first floating-point weight: a quantised linear layer's codes (uint8) say nothing of the dtype.
    params = list(model.get_submodule(exit.layer_name).parameters())
    weight = next((p for p in params if p.is_floating_point()), params[0])
    return weight.dtype, weight.device


class BottleneckMethod(Method):
    name = "bottleneck"
    config_class = BottleneckConfig
    can_merge = False
    composition_note = "bottleneck adapters train inside the backbone, which READ runs without autograd"

    def composes_with(self, other: str) -> bool:
        return other in {"bottleneck", "lora", "vera", "fusion", "tokentune", "prefix_tuning", "prompt_tuning",
                         "p_tuning"}

    def record(self, state: PatchState | None) -> BottleneckRecord | None:
        return None if state is None else state.method_states.get(self.name)

    # --- patching ------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config: BottleneckConfig) -> Plan:
        from pypeft.targets import find_modules_to_save

        to_save = find_modules_to_save(model, config.modules_to_save, owner=OWNER)
        try:
            _, exits = sublayer_exits(model)
        except ValueError as e:
            raise ValueError(f"{OWNER}: argument 'model': {e}") from None
        unknown = [i for i in config.leave_out if i >= len(exits)]
        if unknown:
            raise ValueError(f"{OWNER}: argument 'leave_out': layer {unknown[0]} does not exist (the model has "
                             f"{len(exits)} layers)")
        hidden = hidden_size(model)
        chosen = []
        for attention, feed_forward in exits:
            if attention.layer in config.leave_out:
                continue
            if config.mh_adapter:
                chosen.append(attention)
            if config.output_adapter:
                chosen.append(feed_forward)
        if not chosen:
            raise ValueError(f"{OWNER}: argument 'leave_out': it leaves out every layer")
        sizes = {site_name(e): config.bottleneck_size(e.layer, hidden) for e in chosen}
        return Plan(self, config, [site_name(e) for e in chosen], to_save, extra=Placement(chosen, sizes, hidden))

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        exits, sizes, hidden = plan.extra.exits, plan.extra.sizes, plan.extra.hidden
        record = state.method_states.setdefault(self.name, BottleneckRecord())
        for exit in exits:
            name = site_name(exit)
            if name not in record.exits:
                layer = model.get_submodule(exit.layer_name)
                if not hasattr(layer, CONTAINER):
                    layer.add_module(CONTAINER, nn.ModuleDict())
                site = BottleneckSite(hidden)
                site.train(layer.training)
                site.bind(state.context)
                getattr(layer, CONTAINER)[exit.sublayer] = site
                record.exits[name] = exit
            dtype, device = layer_dtype(model, exit)
            model.get_submodule(name).add_adapter(plan.adapter_name, plan.config, sizes[name], dtype, device)
        self.install_hooks(model, state)

    @staticmethod
    def remove_hooks(model: nn.Module, state: PatchState) -> None:
        """Our hooks off every module at an exit, and off the originals other
        methods replaced (LoRA wrapping o_proj after us: the original, which
        unpatch puts back, still has the hook)."""
        record = state.method_states[BottleneckMethod.name]
        paths = {p for e in record.exits.values() for p in (e.output, e.residual)}
        remove_hooks([model.get_submodule(p) for p in paths])
        remove_hooks([m for original in state.replaced.values() for m in original.modules()])

    def install_hooks(self, model: nn.Module, state: PatchState) -> None:
        """(Re)install the hooks on the modules now at the exits' paths."""
        self.remove_hooks(model, state)
        for name, exit in self.record(state).exits.items():
            site = model.get_submodule(name)
            norm = model.get_submodule(exit.norm) if exit.norm else None
            model.get_submodule(exit.output).register_forward_hook(ExitHook(site, norm))
            if site.needs_residual():
                hook = ResidualHook(site, exit.residual_arg, exit.residual_kwarg)
                model.get_submodule(exit.residual).register_forward_pre_hook(hook, with_kwargs=True)

    def model_changed(self, model: nn.Module, state: PatchState) -> None:
        self.install_hooks(model, state)

    def adapter_deleted(self, model: nn.Module, state: PatchState, name: str) -> None:
        self.install_hooks(model, state)  # a site may no longer need the residual

    def detach(self, model: nn.Module, state: PatchState) -> None:
        self.remove_hooks(model, state)
        record = state.method_states.pop(self.name)
        for exit in record.exits.values():
            layer = model.get_submodule(exit.layer_name)
            if hasattr(layer, CONTAINER):
                delattr(layer, CONTAINER)

    # --- disk: the adapters library's format (library_format.py) --------------------
    weights_names = ("adapter.safetensors", "pytorch_adapter.bin")

    def recognises(self, fields: dict) -> bool:
        return lib.is_library_bottleneck(fields)

    def format_name(self) -> str:
        return "the adapters library's bottleneck adapter"

    def format_hint(self) -> str:
        return "the adapters library's (a 'config' object with mh_adapter, output_adapter, reduction_factor)"

    def to_disk(self, model: nn.Module, state: PatchState, name: str):
        from pypeft.targets import modules_to_save_keys

        record = state.adapters[name]
        exits = self.record(state).exits
        sites = {s: (exits[s], model.get_submodule(s).adapters[name]) for s in record.layers}
        heads = modules_to_save_keys(model, record.config.modules_to_save) if record.modules_to_save else []
        return lib.config_json(model, record.config, name, heads), lib.tensors_of(sites, name)

    def extra_files(self, model: nn.Module, state: PatchState, name: str, heads: dict) -> dict:
        return lib.head_files(model, heads)

    def heads_from_disk(self, directory, fields: dict, model: nn.Module):
        if lib.HEADS_KEY in fields:  # saved by pypeft: its heads are in the weights file
            return None
        return lib.read_heads(directory, model)

    def comparable(self, fields: dict) -> dict:
        return {"name": fields.get("name"), **lib.config_from_json(fields, "x").math_fields()}

    def config_from_disk(self, fields: dict, adapter_name: str) -> BottleneckConfig:
        return lib.config_from_json(fields, adapter_name)

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        placement: Placement = plan.extra
        saved_name = fields.get("name")
        if not isinstance(saved_name, str) or not saved_name:
            raise ValueError("field 'name' (the adapter's name, part of every weight key) is missing")
        file_key = lib.check_model(fields, model, placement.hidden)
        shapes = {}
        for exit in placement.exits:
            m, d = placement.sizes[site_name(exit)], placement.hidden
            for ours, shape in (("down_weight", (m, d)), ("down_bias", (m,)), ("up_weight", (d, m)),
                                ("up_bias", (d,))):
                key = file_key(lib.key_prefix(exit, saved_name) + lib.PARAMS[ours], tensors)
                placement.file_keys[(site_name(exit), ours)] = key
                shapes[key] = shape
        return shapes

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        for (site, ours), key in plan.extra.file_keys.items():
            getattr(model.get_submodule(site).adapters[plan.adapter_name], ours).copy_(tensors[key])
