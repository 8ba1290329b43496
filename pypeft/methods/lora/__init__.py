"""LoRA (Hu et al., 2021): a frozen linear layer plus trainable low-rank updates, in PEFT's format."""

from pypeft.methods.lora.config import LoraConfig, lora_scaling
from pypeft.methods.lora.layer import LoraLinear
from pypeft.methods.lora.method import LoraMethod
from pypeft.registry import register_method

register_method(LoraMethod())

__all__ = ["LoraConfig", "LoraLinear", "LoraMethod", "lora_scaling"]
