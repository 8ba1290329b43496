"""VeRA's place in pypeft: AdaptedLinear layers over one pair of shared
random matrices per model (its per-model state), PEFT's VERA format on disk
(the matrices saved once, as base_model.vera_A / vera_B, or regenerated from
the seed), every peft VeraConfig field sorted as for LoRA."""

from __future__ import annotations

import torch
from torch import nn

from pypeft.methods.linear_method import LinearAdapterMethod
from pypeft.methods.vera.config import VeraConfig
from pypeft.methods.vera.layer import VeraLinear, VeraProjections
from pypeft.registry import Plan
from pypeft.state import PatchState
from pypeft.targets import base_dims, base_module

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


def projections_of(state: PatchState | None) -> VeraProjections | None:
    """The matrices the model's VeRA adapters share, if it has any."""
    return None if state is None else state.method_states.get(VeraMethod.name)


class VeraMethod(LinearAdapterMethod):
    name = "vera"
    config_class = VeraConfig
    layer_class = VeraLinear
    peft_type = "VERA"
    used_fields = {"projection_prng_key", "save_projection", "vera_dropout"}
    # λ_d's starting value and whether λ_b starts at zero: the loaded λs replace both.
    init_only_fields = {"d_initial", "init_weights"}

    def plan_extra(self, model: nn.Module, state: PatchState | None, config: VeraConfig,
                   targets: list[str]) -> VeraProjections:
        """The model's shared matrices: the existing ones, if they fit this
        adapter, or new ones sized by its largest layer."""
        dims = {name: base_dims(model, name) for name in targets}
        existing = projections_of(state)
        if existing is not None:
            existing.check_compatible(config, dims, "pypeft.patch(method='vera')")
            return existing
        return VeraProjections.for_layers(config, list(dims.values()), base_module(model.get_submodule(targets[0])))

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        state.method_states[self.name] = plan.extra
        super().attach(model, state, plan)

    def add_to_layer(self, layer: VeraLinear, state: PatchState, plan: Plan) -> None:
        c = plan.config
        layer.add_adapter(c.adapter_name, plan.extra, c.d_initial, c.dropout)

    def adapter_deleted(self, model: nn.Module, state: PatchState, name: str) -> None:
        if not any(r.config.method == self.name for r in state.adapters.values()):
            state.method_states.pop(self.name, None)  # the next VeRA adapter may bring new matrices

    # --- disk ---------------------------------------------------------------------------
    def config_fields(self, config: VeraConfig) -> dict:
        return {"r": config.r, "projection_prng_key": config.projection_seed,
                "save_projection": config.save_projection, "vera_dropout": config.dropout,
                "d_initial": config.d_initial, "init_weights": True}

    def config_from_peft(self, fields: dict, adapter_name: str) -> VeraConfig:
        return VeraConfig(r=fields.get("r", 256), target_modules=fields.get("target_modules"),
                          projection_seed=fields.get("projection_prng_key", 0),
                          d_initial=fields.get("d_initial", 0.1), dropout=fields.get("vera_dropout", 0.0),
                          save_projection=bool(fields.get("save_projection", True)), adapter_name=adapter_name)

    def layer_tensors(self, layer: VeraLinear, adapter: str) -> dict:
        return {"vera_lambda_d": layer.vera_lambda_d[adapter], "vera_lambda_b": layer.vera_lambda_b[adapter]}

    def layer_shapes(self, config: VeraConfig, n_in: int, n_out: int) -> dict:
        return {"vera_lambda_d": (config.r,), "vera_lambda_b": (n_out,)}

    def model_tensors(self, state: PatchState, config: VeraConfig) -> dict:
        if not config.save_projection:
            return {}
        projections = projections_of(state)
        return dict(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        shapes = super().expected_tensors(model, state, plan, fields, tensors)
        saved = self._saved_projections(model, state, plan, tensors)
        if saved is not None:
            shapes.update({k: tuple(t.shape) for k, t in zip(PROJECTION_KEYS, saved)})
        return shapes

    def _saved_projections(self, model: nn.Module, state: PatchState | None, plan: Plan,
                           tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The shared matrices saved with the adapter (checked against the
        layers and against the model's own, if it has VeRA adapters already),
        or None when the seed is to regenerate them."""
        config = plan.config
        if not all(k in tensors for k in PROJECTION_KEYS):
            if config.save_projection:
                raise ValueError(f"save_projection is true but {PROJECTION_KEYS[0]!r} / {PROJECTION_KEYS[1]!r} "
                                 "are missing")
            return None
        a, b = (tensors[k] for k in PROJECTION_KEYS)
        dims = [base_dims(model, n) for n in plan.targets]
        need_in, need_out = max(d[0] for d in dims), max(d[1] for d in dims)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.r or b.shape[1] != config.r \
                or a.shape[1] < need_in or b.shape[0] < need_out:
            raise ValueError(f"shared matrices {PROJECTION_KEYS[0]!r} {list(a.shape)} and {PROJECTION_KEYS[1]!r} "
                             f"{list(b.shape)}: expected [{config.r}, >={need_in}] and [>={need_out}, {config.r}]")
        existing = projections_of(state)
        if existing is not None:
            same = existing.vera_A.shape == a.shape and existing.vera_B.shape == b.shape and \
                torch.equal(existing.vera_A.cpu().to(a.dtype), a) and torch.equal(existing.vera_B.cpu().to(b.dtype), b)
            if not same:
                raise ValueError("its shared VeRA matrices differ from the ones the model's VeRA adapters share; "
                                 "every VeRA adapter on a model must share them")
        return a, b

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        if all(k in tensors for k in PROJECTION_KEYS):
            shared = projections_of(state)
            like = shared.vera_A
            shared.vera_A, shared.vera_B = (tensors[k].to(device=like.device, dtype=like.dtype)
                                            for k in PROJECTION_KEYS)
        super().load_tensors(model, state, plan, tensors)
