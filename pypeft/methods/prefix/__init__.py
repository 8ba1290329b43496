"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes in every
layer's attention, through transformers' attention seam, in peft's format."""

from pypeft.methods.prefix.config import PrefixTuningConfig
from pypeft.methods.prefix.method import PrefixTuningMethod
from pypeft.registry import register_method

register_method(PrefixTuningMethod())

__all__ = ["PrefixTuningConfig", "PrefixTuningMethod"]
