"""Bottleneck adapters on disk in the `adapters` library's (AdapterHub) format,
so an adapter moves between that library and pypeft both ways:

    adapter_config.json   {"config": {<BnConfig fields>}, "name", "model_type", "hidden_size",
                           "model_class", "model_name", "version"}
    adapter.safetensors   "<layer>.<where>.adapters.<name>.adapter_down.0.weight" / ".bias",
                          "... .adapter_up.weight" / ".bias"   (pytorch_adapter.bin is read too)

<where> is the library's module for the exit (pypeft/models/sublayers.py:
BERT's `attention.output` / `output`, the others' `attention_adapters` /
`output_adapters`). Keys are the model's state-dict names, with or without
its base-model prefix ("bert.", "transformer.", "model.": the library saves a
base model's adapter without it). pypeft adds "pypeft_modules_to_save" to the
config, and the heads it trained beside the adapter to the weights under
PEFT's prefix; the library ignores both.

The library's peft-style content check: a config of this format has a
"config" object describing a bottleneck (architecture null or "bottleneck",
with mh_adapter/output_adapter/reduction_factor), where peft's has a
top-level "peft_type".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pypeft.methods.bottleneck.config import ACTIVATIONS, BottleneckConfig
from pypeft.models.sublayers import SublayerExit

VERSION = "pypeft"  # the library reads "version" only to fix up LoRA adapters of its own old versions
PARAMS = {"down_weight": "adapter_down.0.weight", "down_bias": "adapter_down.0.bias",
          "up_weight": "adapter_up.weight", "up_bias": "adapter_up.bias"}
HEADS_KEY = "pypeft_modules_to_save"

# BnConfig fields pypeft does not run, with the value that makes them inert; any other value is refused
# by name. (init_weights, init_weights_seed, phm_* with phm_layer false and the inverse adapter's factor
# without an inverse adapter only shape initialisation or nothing: they load.)
INERT = {"original_ln_after": True, "residual_before_ln": True, "ln_before": False, "ln_after": False,
         "use_gating": False, "phm_layer": False, "inv_adapter": None, "cross_adapter": False,
         "stochastic_depth": 0.0}
INIT_ONLY = {"init_weights", "init_weights_seed", "adapter_residual_before_ln", "inv_adapter_reduction_factor",
             "phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
             "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "architecture"}
RUN = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before", "is_parallel",
       "scaling", "leave_out", "dropout")


def is_library_bottleneck(fields: dict) -> bool:
    config = fields.get("config")
    return ("peft_type" not in fields and isinstance(config, dict)
            and config.get("architecture") in (None, "bottleneck")
            and all(k in config for k in ("mh_adapter", "output_adapter", "reduction_factor")))


def config_json(model: nn.Module, config: BottleneckConfig, name: str, heads: list[str]) -> dict:
    library = {k: getattr(config, k) for k in RUN}
    library.update(INERT)
    library.update(leave_out=list(config.leave_out), init_weights=config.init_weights, init_weights_seed=None,
                   architecture=None)
    return {
        "config": library,
        "name": name,
        **model_fields(model),
        HEADS_KEY: heads,
    }


def model_fields(model: nn.Module) -> dict:
    """What the library records about the model beside an adapter or fusion."""
    model_config = getattr(model, "config", None)
    return {"model_type": getattr(model_config, "model_type", None),
            "hidden_size": getattr(model_config, "hidden_size", None),
            "model_class": type(model).__name__,
            "model_name": getattr(model_config, "_name_or_path", None) or None,
            "version": VERSION}


def check_model(fields: dict, model: nn.Module, hidden: int):
    """Refuse files saved for another kind of model (the library itself does
    not check), and return the file's key for a key of this model: with or
    without the base-model prefix, as the file has them (see the module doc)."""
    if fields.get("hidden_size") not in (None, hidden):
        raise ValueError(f"saved for hidden_size {fields['hidden_size']}, but this model's is {hidden}")
    here = getattr(getattr(model, "config", None), "model_type", None)
    if fields.get("model_type") not in (None, here):
        raise ValueError(f"saved for a {fields['model_type']!r} model, but this model is {here!r}")
    return lambda key, tensors: key if _with_prefix(model, tensors) else strip_base_prefix(model, key)


def _with_prefix(model: nn.Module, tensors) -> bool:
    prefix = getattr(model, "base_model_prefix", "")
    return not prefix or any(k.startswith(prefix + ".") for k in tensors)


def config_from_json(fields: dict, adapter_name: str) -> BottleneckConfig:
    library = fields["config"]
    for key, inert in INERT.items():
        if key in library and library[key] != inert:
            raise ValueError(f"option config.{key}={library[key]!r} is not supported by pypeft's bottleneck adapters "
                             f"(supported: {inert!r})")
    unknown = sorted(set(library) - set(INERT) - INIT_ONLY - set(RUN))
    if unknown:
        raise ValueError(f"option config.{unknown[0]}={library[unknown[0]]!r} is unknown to pypeft's bottleneck "
                         "adapters (a newer adapters library's option?)")
    for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
        if key not in library:
            raise ValueError(f"field config.{key} is missing")
    if str(library["non_linearity"]).lower() not in ACTIVATIONS:
        raise ValueError(f"option config.non_linearity={library['non_linearity']!r} is not supported (supported: "
                         f"{sorted(ACTIVATIONS)})")
    init = library.get("init_weights", "bert")
    return BottleneckConfig(
        preset="pfeiffer", mh_adapter=library["mh_adapter"], output_adapter=library["output_adapter"],
        reduction_factor=library["reduction_factor"], non_linearity=library["non_linearity"],
        original_ln_before=library.get("original_ln_before", False), is_parallel=library.get("is_parallel", False),
        scaling=library.get("scaling", 1.0), dropout=library.get("dropout", 0.0),
        leave_out=library.get("leave_out", []), init_weights=init if init in ("bert", "houlsby", "mam_adapter")
        else "bert", modules_to_save=list(fields.get(HEADS_KEY) or []), adapter_name=adapter_name)


def key_prefix(exit: SublayerExit, name: str) -> str:
    return f"{exit.library_module}.adapters.{name}."


def strip_base_prefix(model: nn.Module, key: str) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key


def tensors_of(sites: dict[str, tuple[SublayerExit, nn.Module]], name: str) -> dict[str, torch.Tensor]:
    """sites: site name -> (exit, its BottleneckWeights for adapter `name`)."""
    out = {}
    for exit, weights in sites.values():
        for ours, theirs in PARAMS.items():
            out[key_prefix(exit, name) + theirs] = getattr(weights, ours)
    return out


# --- heads: the library keeps a model's head in files of its own -------------------------
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")


def head_files(model: nn.Module, heads: dict[str, torch.Tensor]) -> dict:
    """head_config.json and model_head.safetensors as the library writes them
    for a model with a static head (loaded there when model_class matches)."""
    if not heads:
        return {}
    from safetensors.torch import save_file

    model_config = getattr(model, "config", None)
    config = {"config": None, "name": None, "num_labels": getattr(model_config, "num_labels", None),
              "label2id": getattr(model_config, "label2id", None), **model_fields(model)}

    def write_config(path):
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    return {HEAD_CONFIG: write_config, HEAD_WEIGHTS[0]: lambda path: save_file(heads, path)}


def read_heads(directory: Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The classifier head the library saved beside an adapter, by its keys in
    `model`, when it was saved from this model class (the library's own rule);
    None otherwise. A causal LM's lm_head is left out: the library saves it
    with every adapter, untrained, and pypeft does not train it."""
    from pypeft.models import classifier_head_names

    config_path = directory / HEAD_CONFIG
    weights = next((directory / n for n in HEAD_WEIGHTS if (directory / n).is_file()), None)
    if not config_path.is_file() or weights is None:
        return None
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or config.get("model_class") != type(model).__name__:
        return None
    if weights.suffix == ".bin":
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        tensors = load_file(weights)
    heads = classifier_head_names(model)  # peft's plain-suffix rule: "classifier" takes pre_classifier too
    return {k: v for k, v in tensors.items() if k.split(".")[0].endswith(tuple(heads))} or None
