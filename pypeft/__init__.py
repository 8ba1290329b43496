"""pypeft: parameter-efficient fine-tuning as native PyTorch ops.

    import pypeft
    pypeft.patch(model, method="lora", r=8, alpha=16, dropout=0.1)   # or pypeft.LoraConfig(...)
    pypeft.patch(model, method="vera", r=256)                        # or pypeft.VeraConfig(...)
    pypeft.patch(model, method="tokentune", k=16)                    # composes with LoRA / VeRA
    pypeft.patch(model, method="read", rnn="gru", hidden=256)        # or pypeft.ReadConfig(...)
    pypeft.patch(model, method="bottleneck", preset="pfeiffer")     # or pypeft.BottleneckConfig(...)
    pypeft.patch(model, method="fusion", adapters=["a", "b"])      # AdapterFusion of bottleneck adapters
    pypeft.patch(model, method="bitfit")                             # biases only; or pypeft.BitFitConfig(...)
    pypeft.patch(model, method="prefix_tuning", num_virtual_tokens=20)  # or pypeft.PrefixTuningConfig(...)
    pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=20)  # or pypeft.PromptTuningConfig(...)
    pypeft.patch(model, method="p_tuning", encoder="lstm")           # or pypeft.PTuningConfig(...)
    ... train ...
    pypeft.save_adapter(model, "out/")        # PEFT's format: loads into `peft` too
    pypeft.distributed.save_adapter(model, "out/")  # DDP / FSDP2: every rank calls it, rank 0 writes

    trainer = pypeft.PypeftTrainer(model=model, args=...)  # transformers.Trainer; checkpoints hold the adapter

    pypeft.quantize(model, "nf4")             # QLoRA's NF4 base (bitsandbytes' format); pypeft.quant
    with pypeft.counter_hash_dropout(model):  # the model's dropout from the counter hash: a cheaper draw
        ...train...

A method of your own plugs in the same way (docs/ARCHITECTURE.md): subclass
pypeft.Method, put its modules in the model as pypeft.PypeftLayer
subclasses, and call pypeft.register_method(YourMethod()).
"""

from pypeft import distributed, ops
from pypeft.counter_hash import counter_hash_dropout
from pypeft.io import AdapterFormatError, load_adapter, save_adapter
from pypeft.layer import PypeftLayer
from pypeft.methods.bottleneck import BottleneckConfig
from pypeft.methods.fusion import FusionConfig
from pypeft.methods.bitfit import BitFitConfig, BitFitLayer
from pypeft.methods.lora import LoraConfig, LoraLinear
from pypeft.methods.prefix import PrefixTuningConfig
from pypeft.methods.prompt import PromptTuningConfig, PTuningConfig, prompt_ensemble
from pypeft.methods.read import ReadConfig
from pypeft.methods.tokentune import TokenTuneConfig
from pypeft.methods.vera import VeraConfig, VeraLinear
from pypeft.mixed_batch import mixed_batch
from pypeft.quant.quantize_model import quantize
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
from pypeft.registry import Method, Plan, register_method
from pypeft.state import state_of

__all__ = [
    "AdapterFormatError",
    "BottleneckConfig",
    "counter_hash_dropout",
    "FusionConfig",
    "BitFitConfig",
    "BitFitLayer",
    "LoraConfig",
    "LoraLinear",
    "Method",
    "Plan",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "PypeftSeq2SeqTrainer",
    "PypeftTrainer",
    "PypeftTrainerMixin",
    "PypeftLayer",
    "ReadConfig",
    "TokenTuneConfig",
    "VeraConfig",
    "VeraLinear",
    "delete_adapter",
    "disabled",
    "distributed",
    "load_adapter",
    "merge",
    "mixed_batch",
    "ops",
    "patch",
    "prompt_ensemble",
    "quantize",
    "register_method",
    "save_adapter",
    "set_adapter",
    "state_of",
    "trainable_parameters",
    "unmerge",
    "unpatch",
]
__version__ = "0.1.0"

_TRAINER_NAMES = ("PypeftTrainer", "PypeftSeq2SeqTrainer", "PypeftTrainerMixin")


def __getattr__(name):
    # The Trainer classes import transformers.Trainer (and accelerate): only when asked for.
    if name in _TRAINER_NAMES:
        from pypeft.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'pypeft' has no attribute {name!r}")
