"""What each method's adapters look like in PEFT's on-disk format: the
adapter_config.json fields and the tensor names, per method. pypeft/io.py
does the reading, checking and atomic writing for every method alike.

Key names: a layer's tensors are f"base_model.model.<layer>.<suffix>" (LoRA:
lora_A.weight, lora_B.weight; VeRA: vera_lambda_d, vera_lambda_b); VeRA's
shared matrices, when saved, are "base_model.vera_A" and "base_model.vera_B".
"""

from __future__ import annotations

import torch

from pypeft.methods.lora import LoraConfig, LoraLinear
from pypeft.methods.vera import VeraConfig, VeraLinear

PREFIX = "base_model.model."  # PEFT's prefix for keys of the wrapped model


class LoraFormat:
    peft_type = "LORA"
    layer_class = LoraLinear
    # Options that change what the weights mean; pypeft loads only the plain kind.
    plain = {"use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
             "layers_to_transform": None, "target_parameters": None}

    @staticmethod
    def config_fields(config: LoraConfig) -> dict:
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.rslora,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @staticmethod
    def config_from_peft(fields: dict, adapter_name: str) -> LoraConfig:
        return LoraConfig(r=fields["r"], alpha=fields.get("lora_alpha", 8), dropout=fields.get("lora_dropout", 0.0),
                          target_modules=fields.get("target_modules"), rslora=bool(fields.get("use_rslora")),
                          adapter_name=adapter_name, modules_to_save=fields.get("modules_to_save"))

    @staticmethod
    def layer_tensors(layer: LoraLinear, adapter: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": layer.lora_A[adapter], "lora_B.weight": layer.lora_B[adapter]}

    @staticmethod
    def layer_shapes(config: LoraConfig, n_in: int, n_out: int) -> dict[str, tuple]:
        return {"lora_A.weight": (config.r, n_in), "lora_B.weight": (n_out, config.r)}

    @staticmethod
    def model_tensors(state, config) -> dict[str, torch.Tensor]:
        """Tensors of the whole model (not of a layer) that the adapter saves."""
        return {}


class VeraFormat:
    peft_type = "VERA"
    layer_class = VeraLinear
    plain = {"bias": "none", "layers_to_transform": None, "init_weights": True}
    PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")

    @staticmethod
    def config_fields(config: VeraConfig) -> dict:
        return {
            "r": config.r,
            "projection_prng_key": config.projection_seed,
            "save_projection": config.save_projection,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
            "init_weights": True,
        }

    @staticmethod
    def config_from_peft(fields: dict, adapter_name: str) -> VeraConfig:
        return VeraConfig(r=fields.get("r", 256), target_modules=fields.get("target_modules"),
                          projection_seed=fields.get("projection_prng_key", 0),
                          d_initial=fields.get("d_initial", 0.1), dropout=fields.get("vera_dropout", 0.0),
                          save_projection=bool(fields.get("save_projection", True)), adapter_name=adapter_name,
                          modules_to_save=fields.get("modules_to_save"))

    @staticmethod
    def layer_tensors(layer: VeraLinear, adapter: str) -> dict[str, torch.Tensor]:
        return {"vera_lambda_d": layer.vera_lambda_d[adapter], "vera_lambda_b": layer.vera_lambda_b[adapter]}

    @staticmethod
    def layer_shapes(config: VeraConfig, n_in: int, n_out: int) -> dict[str, tuple]:
        return {"vera_lambda_d": (config.r,), "vera_lambda_b": (n_out,)}

    @classmethod
    def model_tensors(cls, state, config: VeraConfig) -> dict[str, torch.Tensor]:
        if not config.save_projection:
            return {}
        projections = state.vera_projections
        return dict(zip(cls.PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))


FORMATS = {"lora": LoraFormat, "vera": VeraFormat}
FORMAT_OF_PEFT_TYPE = {f.peft_type: f for f in FORMATS.values()}
