"""Prefix tuning's place in pypeft: attach() adds a PrefixEncoders layer to
the top-level model (attribute ENCODERS_ATTR), tags every attention module
with its PrefixSite, routes attention through the prefix attention function
(which delegates to the implementation the model had), and hooks the model's
forward to shift positions past the prefix. detach() undoes exactly that,
also when the last prefix adapter is deleted. On disk: peft's PREFIX_TUNING
format (prompt_embeddings = the encoder's output); loading is peft's
inference-mode loading (the adapter holds the prefix itself, no MLP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pypeft.methods.config_checks import check_runs_natively
from pypeft.methods.peft_fields import check_fields
from pypeft.methods.prefix import attention
from pypeft.methods.prefix.config import PrefixTuningConfig
from pypeft.methods.prefix.encoder import PrefixEncoders
from pypeft.methods.prefix.geometry import Geometry, geometry
from pypeft.methods.prefix.positions import PositionHook, accepts_position_ids, position_start
from pypeft.methods.prefix.sites import SITE_ATTR, PrefixSite, find_sites
from pypeft.models import task_type
from pypeft.registry import Method, Plan
from pypeft.state import PatchState
from pypeft.targets import find_modules_to_save, modules_to_save_keys

WHERE = "pypeft.patch(method='prefix_tuning')"
ENCODERS_ATTR = "pypeft_prefix"
PEFT_TYPE = "PREFIX_TUNING"
# Methods that own the model's inputs or attention as prefix tuning does.
_REFUSED = {
    "read": "READ runs the backbone without autograd, which the prefix trains through",
    "prompt_tuning": "both change what the model attends to before the real tokens; one prompt-learning method "
                     "per model, as in peft",
    "p_tuning": "both change what the model attends to before the real tokens; one prompt-learning method per "
                "model, as in peft",
    "tokentune": "not supported yet: both methods own the model's attention implementation",
}
_USED = {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules",
         "prefix_projection", "encoder_hidden_size", "modules_to_save"}
_INIT_ONLY = {"init_weights"}  # how peft initialised the prefix, not what it means


@dataclass
class PrefixRecord:
    """What attach() changed, so that detach() undoes exactly that."""

    geo: Geometry
    encoders: PrefixEncoders
    tagged: list[nn.Module]
    hook: object  # the forward pre-hook's handle
    attn_implementation: str


class PrefixTuningMethod(Method):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig
    can_merge = False
    head_prefix = "base_model."  # peft's prompt-learning models wrap the model once

    def composes_with(self, other: str) -> bool:
        return other not in _REFUSED

    @property
    def composition_note(self) -> str:  # type: ignore[override]
        return "; ".join(f"{k}: {v}" for k, v in _REFUSED.items())

    # --- patching ------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config: PrefixTuningConfig) -> Plan:
        record = state.method_states.get(self.name) if state is not None else None
        if record is None:
            can_set = getattr(model, "_can_set_attn_implementation", None)
            if getattr(model, "config", None) is None or can_set is None or not can_set():
                raise ValueError(f"{WHERE}: argument 'model': expected a transformers model that computes attention "
                                 f"through transformers' AttentionInterface, got {type(model).__name__}")
            previous = model.config._attn_implementation
            if previous not in attention.SUPPORTED:
                raise ValueError(f"{WHERE}: argument 'model': its attention implementation is {previous!r}; prefix "
                                 f"tuning delegates to one of {list(attention.SUPPORTED)} (load the model with "
                                 "attn_implementation='sdpa' or 'eager')")
            if hasattr(model, ENCODERS_ATTR):
                raise ValueError(f"{WHERE}: argument 'model': it has an attribute {ENCODERS_ATTR!r} already")
            check_runs_natively(WHERE, model.parameters())
            geo = geometry(model)
            sites, bias_source = find_sites(model, geo)
        else:
            geo, sites, bias_source = record.geo, None, None
        to_save = find_modules_to_save(model, config.modules_to_save, owner=WHERE)
        return Plan(self, config, targets=[ENCODERS_ATTR], modules_to_save=to_save, extra=(geo, sites, bias_source))

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        geo, sites, bias_source = plan.extra
        record: PrefixRecord | None = state.method_states.get(self.name)
        if record is None:
            previous = model.config._attn_implementation
            encoders = PrefixEncoders(geo)
            encoders.train(model.training)
            encoders.bind(state.context)
            model.add_module(ENCODERS_ATTR, encoders)
            tagged = []
            for module, block in sites:
                module.__dict__[SITE_ATTR] = PrefixSite(block, encoders, previous, bias_source)
                tagged.append(module)
            implementation = attention.register(previous)
            shifts = geo.num_transformer_submodules == 1 and accepts_position_ids(model)
            hook = model.register_forward_pre_hook(
                PositionHook(encoders, position_start(model), shifts, implementation), with_kwargs=True)
            model.set_attn_implementation(implementation)
            record = PrefixRecord(geo, encoders, tagged, hook, previous)
            state.method_states[self.name] = record
        c = plan.config
        record.encoders.add_adapter(c.adapter_name, c.num_virtual_tokens, c.prefix_projection,
                                    c.encoder_hidden_size or geo.token_dim)
        # On the model's device, in float32 whatever the model's dtype, as peft keeps its prompt encoder; the
        # prefix is cast to the keys' dtype where it is used.
        ref = next((p for n, p in model.named_parameters() if not n.startswith(ENCODERS_ATTR + ".")), None)
        if ref is not None:
            record.encoders.encoders[c.adapter_name].to(device=ref.device)

    def adapter_deleted(self, model: nn.Module, state: PatchState, name: str) -> None:
        record: PrefixRecord | None = state.method_states.get(self.name)
        if record is not None and not record.encoders.adapter_names():
            self.detach(model, state)

    def detach(self, model: nn.Module, state: PatchState) -> None:
        record: PrefixRecord = state.method_states.pop(self.name)
        record.hook.remove()
        for module in record.tagged:
            module.__dict__.pop(SITE_ATTR, None)
        if getattr(model, ENCODERS_ATTR, None) is record.encoders:
            delattr(model, ENCODERS_ATTR)
        model.set_attn_implementation(record.attn_implementation)

    # --- disk ----------------------------------------------------------------------
    def recognises(self, fields: dict) -> bool:
        return fields.get("peft_type") == PEFT_TYPE

    def format_name(self) -> str:
        return f"PEFT's {PEFT_TYPE}"

    def format_hint(self) -> str:
        return f'peft_type "{PEFT_TYPE}"'

    def _geometry_fields(self, geo: Geometry) -> dict:
        return {"token_dim": geo.token_dim, "num_attention_heads": geo.num_attention_heads,
                "num_layers": geo.num_layers, "num_transformer_submodules": geo.num_transformer_submodules}

    def to_disk(self, model: nn.Module, state: PatchState, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        record: PrefixRecord = state.method_states[self.name]
        config: PrefixTuningConfig = state.adapters[name].config
        encoder = record.encoders.encoders[name]
        fields = {
            "peft_type": PEFT_TYPE,
            "task_type": task_type(model),
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            "auto_mapping": None,
            "num_virtual_tokens": config.num_virtual_tokens,
            **self._geometry_fields(record.geo),
            "prefix_projection": config.prefix_projection,
            "encoder_hidden_size": config.encoder_hidden_size or record.geo.token_dim,
            "init_weights": None,
            "modules_to_save": modules_to_save_keys(model, config.modules_to_save),
        }
        with torch.no_grad():
            return fields, {"prompt_embeddings": encoder.output().detach()}

    def config_from_disk(self, fields: dict, adapter_name: str) -> PrefixTuningConfig:
        check_fields(fields, PEFT_TYPE, _USED, _INIT_ONLY, {})
        n = fields.get("num_virtual_tokens")
        # peft's inference-mode loading: the file holds the encoder's output, so the adapter is the prefix itself.
        return PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=False,
                                  modules_to_save=fields.get("modules_to_save") or [], adapter_name=adapter_name)

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        geo = plan.extra[0]
        for key, value in self._geometry_fields(geo).items():
            if key in fields and fields[key] is not None and fields[key] != value:
                raise ValueError(f"field {key}={fields[key]!r}, but this model's prefix needs {key}={value} "
                                 "(an adapter for another model?)")
        return {"prompt_embeddings": (plan.config.num_virtual_tokens, geo.width)}

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        encoder = state.method_states[self.name].encoders.encoders[plan.adapter_name]
        encoder.embedding.weight.copy_(tensors["prompt_embeddings"].to(encoder.embedding.weight))
