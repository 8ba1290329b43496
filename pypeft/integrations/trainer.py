"""transformers' Trainer on a pypeft-patched model, as peft users know it:
checkpoints (checkpoint-N/) and trainer.save_model() hold the adapters in
peft's format (adapter_config.json + adapter_model.safetensors, from
pypeft.save_adapter), not the base weights; resume_from_checkpoint and
load_best_model_at_end copy them back into the model's adapters.

Why a Trainer mixin and not a callback: Trainer writes the weights in
Trainer._save (model.save_pretrained: the whole state_dict, base included)
before any callback's on_save runs, and no callback can change that; and on
resume, Trainer._load_from_checkpoint only loads adapter files into a
peft.PeftModel (transformers checks isinstance), so it finds no weights it
can load in an adapter-only checkpoint. Those two methods (and
_load_best_model) are where Trainer treats PeftModel specially, so this
mixin overrides exactly them, and for an unpatched model defers to Trainer.
A save hook on the model (replacing model.save_pretrained) would change
what save_pretrained means for every caller and still not make resuming
work. The mixin composes with other Trainer subclasses (e.g. trl's):
class MyTrainer(PypeftTrainerMixin, SomeTrainer).

The plain Trainer works on a patched model too, without peft's format: it
calls the model's own save_pretrained (the whole patched state_dict, under
pypeft's module names) and resumes with load_state_dict, in place. The
mixin defers to Trainer on such a checkpoint (no adapter files in it), so
PypeftTrainer resumes it as well; the plain Trainer cannot resume the
mixin's adapter-only checkpoints (README, tests/test_trainer_resume.py).

Layout, as peft's PeftModel.save_pretrained: adapter "default" in the
directory itself, any other adapter in a subdirectory named after it.
FSDP and DeepSpeed ZeRO-3 (parameters sharded across ranks) are refused at
construction: the adapter is saved from the whole model rank 0 holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Seq2SeqTrainer, Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINING_ARGS_NAME

from pypeft.io import load_adapter_weights, save_adapter, write_atomically
from pypeft.registry import methods
from pypeft.state import state_of

DEFAULT_ADAPTER = "default"  # peft's name for the adapter stored in the directory itself
TRAINING_STATE_NAME = "pypeft_training_state.safetensors"
METHOD_PREFIX, HEAD_PREFIX = "method.", "modules_to_save."  # its keys: Method.training_state's, the heads'


def adapter_directory(directory: str | os.PathLike, name: str) -> Path:
    """Where adapter `name` lives under a checkpoint directory (peft's layout)."""
    return Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name


def save_adapters(model: torch.nn.Module, directory: str | os.PathLike) -> list[str]:
    """Save every adapter of `model` under `directory` (peft's layout); the
    names saved. Beside an adapter whose format does not keep all it trains
    (Method.training_state: P-tuning's encoder), TRAINING_STATE_NAME holds
    that, and the trained copies of its modules_to_save, for resuming."""
    state = state_of(model)
    for name, record in state.adapters.items():
        where = adapter_directory(directory, name)
        save_adapter(model, where, adapter_name=name)
        extra = methods()[record.config.method].training_state(model, state, name)
        if extra:
            tensors = {f"{METHOD_PREFIX}{k}": v for k, v in extra.items()}
            for module in record.modules_to_save:
                copy = model.get_submodule(module).copies[name]
                tensors.update({f"{HEAD_PREFIX}{module}.{k}": v for k, v in copy.state_dict().items()})
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            # Synced under a temporary name, then renamed: a save cut short never leaves half a file to resume.
            write_atomically(where, {TRAINING_STATE_NAME: lambda path: save_file(tensors, path)})
    return list(state.adapters)


def _load_training_state(model: torch.nn.Module, name: str, path: Path) -> None:
    state = state_of(model)
    record = state.adapters[name]
    tensors = load_file(str(path))
    own = {k[len(METHOD_PREFIX):]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)}
    with torch.no_grad():
        methods()[record.config.method].load_training_state(model, state, name, own)
        for module in record.modules_to_save:
            prefix = f"{HEAD_PREFIX}{module}."
            model.get_submodule(module).copies[name].load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def saved_adapters(model: torch.nn.Module, directory: str | os.PathLike) -> list[str]:
    """The model's adapters that `directory` holds files for: each one's
    config file, by its method's name for it (AdapterFusion's is not
    adapter_config.json: looking for that one only, resuming left a fusion
    as it was initialised, beside the optimizer state of the trained one)."""
    state = state_of(model)
    return [n for n, record in state.adapters.items()
            if (adapter_directory(directory, n) / methods()[record.config.method].config_name).is_file()]


def load_adapters(model: torch.nn.Module, directory: str | os.PathLike) -> list[str]:
    """Copy the adapters saved under `directory` into the model's adapters of
    the same names, in place; the names loaded."""
    names = saved_adapters(model, directory)
    for name in names:
        where = adapter_directory(directory, name)
        if (where / TRAINING_STATE_NAME).is_file():  # all it trains, which its files do not hold
            _load_training_state(model, name, where / TRAINING_STATE_NAME)
        else:
            load_adapter_weights(model, where, adapter_name=name)
    return names


class PypeftTrainerMixin:
    """Makes a transformers Trainer (sub)class save and load a pypeft-patched
    model's adapters instead of its whole state_dict. Put it first:
    class T(PypeftTrainerMixin, Trainer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._pypeft_model() is not None and (self.is_fsdp_enabled or is_deepspeed_zero3_enabled()):
            # Each rank then holds a shard of every parameter; the adapter is saved from the whole model.
            raise ValueError(f"pypeft.{type(self).__name__}: argument 'args': FSDP and DeepSpeed ZeRO-3 shard the "
                             "parameters, and pypeft saves adapters from unsharded ones; expected DDP, DeepSpeed "
                             "ZeRO-1/2 or one process, got " + ("FSDP" if self.is_fsdp_enabled else "ZeRO-3"))

    def _pypeft_model(self):
        """The patched model under any wrapping (DDP, torch.compile), or None;
        None too when it holds no adapter (TokenTune alone trains the base
        weights, which Trainer then saves as usual)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        state = state_of(model)
        return model if state is not None and state.adapters else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._pypeft_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:  # only the main process writes
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(model, output_dir)
        # What Trainer._save writes beside the weights.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        patched = self._pypeft_model()
        if patched is None or not saved_adapters(patched, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(patched, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        patched = self._pypeft_model()
        best = self.state.best_model_checkpoint
        if patched is None or not saved_adapters(patched, best):
            return super()._load_best_model()
        load_adapters(patched, best)


class PypeftTrainer(PypeftTrainerMixin, Trainer):
    """transformers.Trainer that saves and resumes a pypeft-patched model's adapters (peft's format)."""


class PypeftSeq2SeqTrainer(PypeftTrainerMixin, Seq2SeqTrainer):
    """transformers.Seq2SeqTrainer that saves and resumes a pypeft-patched model's adapters (peft's format)."""
