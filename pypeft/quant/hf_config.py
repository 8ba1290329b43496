"""What a quantised model says about itself: `config.quantization_config`,
written as transformers + bitsandbytes write it (a BitsAndBytesConfig), so
that model.save_pretrained(dir) makes a checkpoint that
AutoModelFor*.from_pretrained(dir) loads with bitsandbytes, and pypeft's
loaders know what a checkpoint holds.

bnb's config has no blocksize: each layer's blocksize is in its own
quant_state entry (transformers' default, 64, when it quantises itself).
`llm_int8_skip_modules` lists every linear layer left in full precision by
name: given a list, transformers skips exactly those (it adds its default
head list only when the field is None).
"""

from __future__ import annotations

import re

import torch
from torch import nn


def bnb_config(double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str]):
    fields = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8,
                  llm_int8_skip_modules=list(skip_modules))
    try:
        from transformers import BitsAndBytesConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {"quant_method": "bitsandbytes", **fields, "bnb_4bit_compute_dtype": str(compute_dtype)[6:],
                "bnb_4bit_quant_storage": "uint8"}
    return BitsAndBytesConfig(**fields)


def skip_patterns(left: list[str], quantised: list[str], matches) -> list[str]:
    """Names for llm_int8_skip_modules that transformers' matcher (prefix,
    regex or suffix) reads as these modules and no quantised one: a plain
    name where it is unambiguous, else an anchored regex of it."""
    out = []
    for name in left:
        out.append(name if not any(matches(q, [name]) for q in quantised) else f"^{re.escape(name)}$")
    return out


def record(model: nn.Module, config) -> None:
    hf = getattr(model, "config", None)
    if hf is not None:
        hf.quantization_config = config


def quantization_config(model: nn.Module):
    """The model's quantization_config (a BitsAndBytesConfig), or None."""
    hf = getattr(model, "config", None)
    return getattr(hf, "quantization_config", None) if hf is not None else None


def field(config, name: str):
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def is_nf4(config) -> bool:
    """Whether a quantization_config (object or dict) is bnb 4-bit NF4."""
    if config is None:
        return False
    method = field(config, "quant_method")
    method = getattr(method, "value", method)
    return method == "bitsandbytes" and bool(field(config, "load_in_4bit") or field(config, "_load_in_4bit")) \
        and field(config, "bnb_4bit_quant_type") == "nf4"
