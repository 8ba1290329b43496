"""Adapters on disk, in PEFT's format: adapter_config.json and
adapter_model.safetensors with PEFT's key names, so that adapters move between
pypeft and the `peft` package both ways.

Writes are atomic: both files are written to temporary names in the target
directory, flushed to disk, and only then renamed over the previous ones, so a
crash mid-write leaves the previous adapter intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pypeft.methods.lora import LoraConfig, LoraLinear
from pypeft.methods.modules_to_save import TrainableCopies
from pypeft.models import linear_dims, task_type
from pypeft.models.linear import is_transposed
from pypeft.patch import _require_state, find_modules_to_save, find_targets, patch, set_adapter, state_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix for keys of the wrapped model


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be loaded: missing, corrupt, or for another model."""


# --- saving ---------------------------------------------------------------------

def _peft_config(model: nn.Module, config: LoraConfig, layers: list[str], to_save: list[str]) -> dict:
    fan_in_fan_out = any(is_transposed(model.get_submodule(n).base_layer) for n in layers)
    return {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        # The resolved module names: PEFT's suffix matching selects exactly these.
        "target_modules": layers,
        "modules_to_save": [n.rsplit(".", 1)[-1] for n in to_save] or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    state = _require_state(model, "save_adapter")
    record = state.adapters[adapter_name]
    tensors = {}
    for name in record.layers:
        layer = model.get_submodule(name)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name]
    for name in record.modules_to_save:
        copy = model.get_submodule(name).copies[adapter_name]
        for key, value in copy.state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _write_atomically(directory: Path, files: dict[str, callable]) -> None:
    """files: name -> writer(path). All are written and synced under temporary
    names first, then renamed into place one after the other."""
    directory.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for name, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged.append((tmp, directory / name))
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, final in staged:
            os.replace(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter (default: the active one) in PEFT's format to `directory`."""
    state = _require_state(model, "save_adapter")
    name = adapter_name or state.active
    if name not in state.adapters:
        raise ValueError(f"pypeft.save_adapter: argument 'adapter_name': expected one of "
                         f"{sorted(state.adapters)}, got {name!r}")
    record = state.adapters[name]
    config = _peft_config(model, record.config, record.layers, record.modules_to_save)
    tensors = adapter_state_dict(model, name)
    directory = Path(directory)

    def write_config(path):
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    def write_weights(path):
        save_file(tensors, path, metadata={"format": "pt"})

    # Weights first, config last: the config is what marks a directory as an adapter.
    _write_atomically(directory, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config})
    return directory


# --- loading --------------------------------------------------------------------

def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"pypeft.load_adapter: no {CONFIG_NAME} in {directory}")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"pypeft.load_adapter: {path} holds no JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: expected peft_type 'LORA', got {peft_type!r}")
    # Options that change what the weights mean; pypeft loads only the plain kind.
    plain = {"use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
             "layers_to_transform": None, "target_parameters": None}
    for key, expected in plain.items():
        got = config.get(key)
        if got is not None and got != expected:
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: option {key}={got!r} is not supported "
                                     f"by pypeft's LoRA (expected {expected!r})")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        other = " (only the older adapter_model.bin is there; re-save it with peft as safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"pypeft.load_adapter: no {WEIGHTS_NAME} in {directory}{other}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {path} is corrupt or truncated ({e})") from None


def _lora_config_from_peft(config: dict, adapter_name: str) -> LoraConfig:
    try:
        return LoraConfig(r=config["r"], alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                          target_modules=config.get("target_modules"), rslora=bool(config.get("use_rslora")),
                          adapter_name=adapter_name, modules_to_save=config.get("modules_to_save"))
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {CONFIG_NAME}: {e}") from None


def _expected_shapes(model: nn.Module, config: LoraConfig, layers: list[str], to_save: list[str]):
    shapes = {}
    for name in layers:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        n_in, n_out = linear_dims(base)
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (config.r, n_in)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (n_out, config.r)
    for name in to_save:
        module = model.get_submodule(name)
        source = module.original_module if isinstance(module, TrainableCopies) else module
        for key, value in source.state_dict().items():
            shapes[f"{PREFIX}{name}.{key}"] = tuple(value.shape)
    return shapes


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    for key, shape in shapes.items():
        if key not in tensors:
            raise AdapterFormatError(f"pypeft.load_adapter: {path} has no tensor {key!r}; it was saved for "
                                     "another model or other target modules")
        if tuple(tensors[key].shape) != shape:
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: tensor {key!r}: expected shape "
                                     f"{list(shape)}, got {list(tensors[key].shape)} (an adapter for another model?)")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: tensor {extra[0]!r} belongs to no module of "
                                 "this model")


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load an adapter saved by pypeft or `peft` (PEFT's LoRA format).

    On an unpatched model this patches it and makes the adapter active; on a
    patched one it adds the adapter under `adapter_name` and leaves the active
    adapter as it was (as peft's load_adapter). Everything is checked before
    the model changes: a bad directory raises and loses nothing.
    """
    directory = Path(directory)
    peft_config = _read_config(directory)
    tensors = _read_weights(directory)
    config = _lora_config_from_peft(peft_config, adapter_name)
    state = state_of(model)
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"pypeft.load_adapter: argument 'adapter_name': adapter {adapter_name!r} exists "
                         f"already (adapters: {sorted(state.adapters)})")
    # PEFT lists every head name a task may have (["classifier", "score"]); keep those this model has.
    to_save = find_modules_to_save(model, config.modules_to_save or [], strict=False)
    layers = find_targets(model, config.target_modules, "lora", to_save)
    _check_tensors(directory / WEIGHTS_NAME, tensors, _expected_shapes(model, config, layers, to_save))
    config.modules_to_save = to_save  # what was saved, not the default head
    previous = state.active if state is not None else None
    patch(model, config)
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            layer.lora_A[adapter_name].copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B[adapter_name].copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
        for name in to_save:
            copy = model.get_submodule(name).copies[adapter_name]
            copy.load_state_dict({k[len(PREFIX) + len(name) + 1:]: v for k, v in tensors.items()
                                  if k.startswith(f"{PREFIX}{name}.")})
    if previous is not None:
        set_adapter(model, previous)
    return model
