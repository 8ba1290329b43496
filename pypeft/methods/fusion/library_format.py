"""AdapterFusion on disk in the `adapters` library's format, both ways:

    adapter_fusion_config.json          {"config": {key, query, value, query_before_ln, regularization,
                                          residual_before, temperature, value_before_softmax,
                                          value_initialized, dropout_prob}, "name": "a,b,c",
                                          "adapter_names": ["a", "b", "c"], "model_type",
                                          "hidden_size", "model_class", "model_name", "version"}
    model_adapter_fusion.safetensors    "<where>.adapter_fusion_layer.a,b,c.query.weight" / ".bias",
                                        ".key.weight" / ".bias", ".value.weight"
                                        (pytorch_model_adapter_fusion.bin is read too)

<where> as for the adapters themselves (pypeft/methods/bottleneck/library_format.py);
the fusion's name is its adapters' names joined by commas. pypeft adds the
heads it trained beside the fusion, as for bottleneck adapters.
"""

from __future__ import annotations

from torch import nn

from pypeft.methods.bottleneck.library_format import HEADS_KEY, model_fields
from pypeft.methods.fusion.config import FusionConfig
from pypeft.models.sublayers import SublayerExit

PARAMS = {"query_weight": "query.weight", "query_bias": "query.bias", "key_weight": "key.weight",
          "key_bias": "key.bias", "value_weight": "value.weight"}
# Library fields pypeft runs only at one value (refused by name otherwise).
FIXED = {"query": True, "key": True, "residual_before": False}
FIELDS = {"key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
          "value_before_softmax", "value_initialized", "dropout_prob", "architecture"}


def is_library_fusion(fields: dict) -> bool:
    config = fields.get("config")
    return isinstance(config, dict) and all(k in config for k in ("key", "query", "value"))


def library_name(config: FusionConfig) -> str:
    return ",".join(config.adapters)


def config_json(model: nn.Module, config: FusionConfig, heads: list[str]) -> dict:
    return {
        "config": {"key": True, "query": True, "value": config.value, "query_before_ln": config.query_before_ln,
                   "regularization": config.regularization, "residual_before": False,
                   "temperature": config.temperature, "value_before_softmax": True,
                   "value_initialized": config.value_initialized, "dropout_prob": config.dropout_prob},
        "name": library_name(config),
        "adapter_names": list(config.adapters),  # what the library's loader reads the fused adapters from
        **model_fields(model),
        HEADS_KEY: heads,
    }


def config_from_json(fields: dict, adapter_name: str) -> FusionConfig:
    library = fields["config"]
    for key, only in FIXED.items():
        if library.get(key, only) != only:
            raise ValueError(f"option config.{key}={library[key]!r} is not supported by pypeft's AdapterFusion "
                             f"(supported: {only!r})")
    unknown = sorted(set(library) - FIELDS)
    if unknown:
        raise ValueError(f"option config.{unknown[0]}={library[unknown[0]]!r} is unknown to pypeft's AdapterFusion")
    name = fields.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("field 'name' (the fused adapters' names, joined by commas) is missing")
    names = fields.get("adapter_names", name.split(","))
    if not isinstance(names, list) or ",".join(map(str, names)) != name:
        raise ValueError(f"field 'adapter_names' {names!r} does not match field 'name' {name!r}")
    # value_before_softmax: W_v has no bias, so Σ p_i W_v u_i = W_v Σ p_i u_i: both are the same math.
    return FusionConfig(adapters=names, value=bool(library.get("value")),
                        value_initialized=bool(library.get("value_initialized")),
                        regularization=bool(library.get("regularization")),
                        query_before_ln=bool(library.get("query_before_ln")),
                        temperature=bool(library.get("temperature")), dropout_prob=library.get("dropout_prob"),
                        modules_to_save=list(fields.get(HEADS_KEY) or []), adapter_name=adapter_name)


def key_prefix(exit: SublayerExit, fusion: str) -> str:
    return f"{exit.library_module}.adapter_fusion_layer.{fusion}."
