"""LoRA's place in pypeft: patching through AdaptedLinear layers, PEFT's LORA
format on disk, every peft LoraConfig field sorted into what pypeft reads,
what only affects initialisation, and what changes the math (refused)."""

from __future__ import annotations

from pypeft.methods.linear_method import LinearAdapterMethod
from pypeft.methods.lora.config import LoraConfig
from pypeft.methods.lora.layer import LoraLinear
from pypeft.methods.peft_fields import is_empty

# init_lora_weights values that change the *base* weights at initialisation
# (the adapter then only fits that changed base): peft converts such adapters
# to plain LoRA with path_initial_model_for_weight_conversion.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _plain_init(value) -> bool:
    return not (isinstance(value, str) and value.lower().startswith(_BASE_CHANGING_INITS))


class LoraMethod(LinearAdapterMethod):
    name = "lora"
    config_class = LoraConfig
    layer_class = LoraLinear
    peft_type = "LORA"
    used_fields = {"lora_alpha", "lora_dropout", "use_rslora"}
    init_only_fields = {"loftq_config", "eva_config", "corda_config", "lora_ga_config",
                        # how peft builds or runs layers, not what the weights mean
                        "runtime_config", "megatron_config", "megatron_core", "ensure_weight_tying"}
    neutral_fields = {
        "init_lora_weights": (_plain_init, "an initialisation that leaves the base weights alone (True, False, "
                              "'gaussian', 'eva', 'orthogonal', 'mica'); convert PiSSA/OLoRA/CorDA/LoftQ adapters "
                              "to plain LoRA with peft's path_initial_model_for_weight_conversion"),
        "use_dora": (lambda v: not v, "False"),
        "rank_pattern": (is_empty, "{}"),
        "alpha_pattern": (is_empty, "{}"),
        "target_parameters": (is_empty, "None"),
        "trainable_token_indices": (is_empty, "None"),
        "layer_replication": (is_empty, "None"),
        "lora_bias": (lambda v: not v, "False"),
        "use_qalora": (lambda v: not v, "False"),
        "qalora_group_size": (lambda v: True, "any"),  # read only with use_qalora
        "alora_invocation_tokens": (is_empty, "None"),
        "use_bdlora": (is_empty, "None"),
        "arrow_config": (is_empty, "None"),
        "kasa_config": (is_empty, "None"),
        "velora_config": (is_empty, "None"),
        "monteclora_config": (is_empty, "None"),
    }

    def add_to_layer(self, layer, state, plan) -> None:
        c = plan.config
        layer.add_adapter(c.adapter_name, c.r, c.alpha, c.dropout, c.rslora)

    def config_fields(self, config: LoraConfig) -> dict:
        return {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                "use_rslora": config.rslora, "use_dora": False, "init_lora_weights": True,
                "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None}

    def config_from_peft(self, fields: dict, adapter_name: str) -> LoraConfig:
        # Missing fields take peft's defaults, as peft itself reads the file.
        return LoraConfig(r=fields.get("r", 8), alpha=fields.get("lora_alpha", 8),
                          dropout=fields.get("lora_dropout", 0.0), target_modules=fields.get("target_modules"),
                          exclude_modules=fields.get("exclude_modules") or None,
                          rslora=bool(fields.get("use_rslora")), adapter_name=adapter_name)

    def layer_tensors(self, layer: LoraLinear, adapter: str) -> dict:
        return {"lora_A.weight": layer.lora_A[adapter], "lora_B.weight": layer.lora_B[adapter]}

    def layer_shapes(self, config: LoraConfig, n_in: int, n_out: int) -> dict:
        return {"lora_A.weight": (config.r, n_in), "lora_B.weight": (n_out, config.r)}
