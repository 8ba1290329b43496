"""pypeft: parameter-efficient fine-tuning as native PyTorch ops.

    import pypeft
    pypeft.patch(model, method="lora", r=8, alpha=16, dropout=0.1)   # or pypeft.LoraConfig(...)
    pypeft.patch(model, method="vera", r=256)                        # or pypeft.VeraConfig(...)
    pypeft.patch(model, method="tokentune", k=16)                    # composes with LoRA / VeRA
    pypeft.patch(model, method="read", rnn="gru", hidden=256)        # or pypeft.ReadConfig(...)
    ... train ...
    pypeft.save_adapter(model, "out/")        # PEFT's format: loads into `peft` too
"""

from pypeft import ops
from pypeft.io import load_adapter, save_adapter
from pypeft.methods.lora import LoraConfig, LoraLinear
from pypeft.methods.read import ReadConfig
from pypeft.methods.tokentune import TokenTuneConfig
from pypeft.methods.vera import VeraConfig, VeraLinear
from pypeft.mixed_batch import mixed_batch
from pypeft.patch import (
    delete_adapter,
    disabled,
    merge,
    patch,
    set_adapter,
    trainable_parameters,
    unmerge,
    unpatch,
)

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "ReadConfig",
    "TokenTuneConfig",
    "VeraConfig",
    "VeraLinear",
    "delete_adapter",
    "disabled",
    "load_adapter",
    "merge",
    "mixed_batch",
    "ops",
    "patch",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    "unpatch",
]
__version__ = "0.1.0"
