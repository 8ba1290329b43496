"""AdapterFusion's place in pypeft: a fusion is an adapter of its own (named,
activated, saved), held by the bottleneck sites where every fused adapter
sits (pypeft/methods/bottleneck/site.py runs it). Stage 2 of the paper: the
fused adapters and the backbone are frozen, the fusion layers (and the head)
train. A fused adapter cannot be deleted while a fusion uses it."""

from __future__ import annotations

import torch
from torch import nn

from pypeft.methods.bottleneck import library_format as bottleneck_lib
from pypeft.methods.bottleneck.method import BottleneckMethod, Placement, layer_dtype, site_name
from pypeft.methods.bottleneck.site import FusionSettings
from pypeft.methods.fusion import library_format as lib
from pypeft.methods.fusion.config import OWNER, FusionConfig
from pypeft.registry import Method, Plan
from pypeft.state import PatchState, state_of

TEMPERATURE_START = 50.0  # the library's schedule: T from 50 down by 50/1000 per forward, to 1


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """The library's fusion regularisation, 0.01 · Σ ||I − V||² over the value
    matrices that train (of fusions made with regularization=True); None when
    there are none. Add it to the loss."""
    state = state_of(model)
    if state is None:
        return None
    total = None
    for name, record in state.adapters.items():
        if record.config.method != FusionMethod.name or not record.config.regularization:
            continue
        for site in record.layers:
            value = model.get_submodule(site).fusions[name].value_weight
            if value is not None and value.requires_grad:
                eye = torch.eye(value.shape[0], dtype=value.dtype, device=value.device)
                term = 0.01 * (eye - value).pow(2).sum()
                total = term if total is None else total + term
    return total


class FusionMethod(Method):
    name = "fusion"
    config_class = FusionConfig
    can_merge = False
    composition_note = "AdapterFusion trains inside the backbone, which READ runs without autograd"

    def composes_with(self, other: str) -> bool:
        return other in {"bottleneck", "lora", "vera", "fusion", "tokentune", "prefix_tuning", "prompt_tuning",
                         "p_tuning"}

    # --- patching ------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config: FusionConfig) -> Plan:
        from pypeft.targets import find_modules_to_save

        to_save = find_modules_to_save(model, config.modules_to_save, owner=OWNER)
        adapters = {} if state is None else state.adapters
        missing = [a for a in config.adapters if a not in adapters or adapters[a].config.method != "bottleneck"]
        if missing:
            have = sorted(n for n, r in adapters.items() if r.config.method == "bottleneck")
            raise ValueError(f"{OWNER}: argument 'adapters': {missing[0]!r} is not a bottleneck adapter of the model "
                             f"(its bottleneck adapters: {have}); patch or load the adapters first")
        configs = [adapters[a].config for a in config.adapters]
        if any(c.is_parallel for c in configs):
            raise ValueError(f"{OWNER}: argument 'adapters': parallel adapters cannot be fused (the adapters library "
                             "adds the residual twice for them); fuse sequential (pfeiffer/houlsby) adapters")
        activations = {c.activation for c in configs}
        if len(activations) != 1:
            raise ValueError(f"{OWNER}: argument 'adapters': the fused adapters must share one non_linearity, "
                             f"got {sorted(c.non_linearity for c in configs)}")
        record = state.method_states[BottleneckMethod.name]
        common = [s for s in adapters[config.adapters[0]].layers
                  if all(s in adapters[a].layers for a in config.adapters[1:])]
        if not common:
            raise ValueError(f"{OWNER}: argument 'adapters': {list(config.adapters)} share no layer to fuse at")
        exits = [record.exits[s] for s in common]
        hidden = model.get_submodule(common[0]).hidden
        return Plan(self, config, common, to_save, extra=Placement(exits, {}, hidden))

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        config: FusionConfig = plan.config
        dropout = config.dropout_prob
        if dropout is None:
            dropout = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0
        for exit in plan.extra.exits:
            dtype, device = layer_dtype(model, exit)
            settings = FusionSettings(config.adapters, config.query_before_ln, float(dropout),
                                      TEMPERATURE_START if config.temperature else 1.0,
                                      TEMPERATURE_START / 1000.0 if config.temperature else 0.0)
            model.get_submodule(site_name(exit)).add_fusion(plan.adapter_name, settings, config.value,
                                                            config.value_initialized, dtype, device)

    def check_delete(self, model: nn.Module, state: PatchState, name: str) -> None:
        for fusion, record in state.adapters.items():
            if record.config.method == self.name and name in record.config.adapters:
                raise ValueError(f"pypeft.delete_adapter: adapter {name!r} is fused in {fusion!r}; delete the fusion "
                                 "first")

    # --- disk: the adapters library's format (library_format.py) --------------------
    config_name = "adapter_fusion_config.json"
    weights_names = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")

    def recognises(self, fields: dict) -> bool:
        return lib.is_library_fusion(fields)

    def format_name(self) -> str:
        return "the adapters library's AdapterFusion"

    def format_hint(self) -> str:
        return "the adapters library's AdapterFusion (a 'config' object with key, query, value)"

    def extra_files(self, model: nn.Module, state: PatchState, name: str, heads: dict) -> dict:
        return bottleneck_lib.head_files(model, heads)

    def heads_from_disk(self, directory, fields: dict, model: nn.Module):
        if bottleneck_lib.HEADS_KEY in fields:  # saved by pypeft: its heads are in the weights file
            return None
        return bottleneck_lib.read_heads(directory, model)

    def comparable(self, fields: dict) -> dict:
        return {"name": fields.get("name"), **lib.config_from_json(fields, "x").math_fields()}

    def to_disk(self, model: nn.Module, state: PatchState, name: str):
        from pypeft.targets import modules_to_save_keys

        record = state.adapters[name]
        exits = state.method_states[BottleneckMethod.name].exits
        fusion = lib.library_name(record.config)
        tensors = {}
        for site in record.layers:
            weights = model.get_submodule(site).fusions[name]
            for ours, theirs in lib.PARAMS.items():
                if getattr(weights, ours) is not None:
                    tensors[lib.key_prefix(exits[site], fusion) + theirs] = getattr(weights, ours)
        heads = modules_to_save_keys(model, record.config.modules_to_save) if record.modules_to_save else []
        return lib.config_json(model, record.config, heads), tensors

    def config_from_disk(self, fields: dict, adapter_name: str) -> FusionConfig:
        return lib.config_from_json(fields, adapter_name)

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        placement: Placement = plan.extra
        file_key = bottleneck_lib.check_model(fields, model, placement.hidden)
        fusion, d = lib.library_name(plan.config), placement.hidden
        shapes = {}
        for exit in placement.exits:
            for ours, theirs in lib.PARAMS.items():
                if ours == "value_weight" and not plan.config.value:
                    continue
                key = file_key(lib.key_prefix(exit, fusion) + theirs, tensors)
                placement.file_keys[(site_name(exit), ours)] = key
                shapes[key] = (d, d) if ours.endswith("weight") else (d,)
        return shapes

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        for (site, ours), key in plan.extra.file_keys.items():
            getattr(model.get_submodule(site).fusions[plan.adapter_name], ours).copy_(tensors[key])
