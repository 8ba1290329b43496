"""READ adapters on disk. PEFT has no format for READ, so pypeft writes its
own, beside the PEFT ones and with the same file names and atomic writes
(pypeft/io.py): adapter_config.json says `"pypeft_method": "read"` and the
options, and the stack it was trained on (name, layer count, width: checked
on load); adapter_model.safetensors holds the side network under
"read.<name>" (weight_ih, weight_hh, bias_ih, bias_hh: torch.nn.GRUCell's
names and layout; joiner.weight, joiner.bias) and the heads trained in full
under PEFT's "base_model.model.<module>.<key>", as the other methods do.
"""

from __future__ import annotations

import torch
from torch import nn

from pypeft.methods.peft_fields import METHOD_KEY
from pypeft.methods.read.config import RNN_TYPES, ReadConfig
from pypeft.models import task_type
from pypeft.targets import modules_to_save_keys

NETWORK_PREFIX = "read."


def is_read_config(fields: dict) -> bool:
    return fields.get(METHOD_KEY) == "read"


def config_json(model: nn.Module, record, config: ReadConfig) -> dict:
    stack = record.stack
    return {
        METHOD_KEY: "read",
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "stack": stack.name,
        "stack_layers": len(stack.layers),
        "width": record.adapters.width,
        "modules_to_save": modules_to_save_keys(model, config.modules_to_save),
        **config.to_json(),
    }


def config_from_json(fields: dict, adapter_name: str) -> ReadConfig:
    for key in ("rnn", "hidden"):
        if key not in fields:
            raise ValueError(f"field {key!r} is missing")
    return ReadConfig(rnn=fields["rnn"], hidden=fields["hidden"], layers=fields.get("layers"),
                      aggregate=fields.get("aggregate", "mean"), modules_to_save=fields.get("modules_to_save") or [],
                      adapter_name=adapter_name)


def network_tensors(record, adapter_name: str) -> dict[str, torch.Tensor]:
    network = record.adapters.networks[adapter_name]
    return {NETWORK_PREFIX + k: v for k, v in network.state_dict().items()}


def network_shapes(config: ReadConfig, width: int) -> dict[str, tuple]:
    rows = RNN_TYPES[config.rnn] * config.hidden
    shapes = {"weight_ih": (rows, width), "weight_hh": (rows, config.hidden), "bias_ih": (rows,),
              "bias_hh": (rows,), "joiner.weight": (width, config.hidden), "joiner.bias": (width,)}
    return {NETWORK_PREFIX + k: v for k, v in shapes.items()}
