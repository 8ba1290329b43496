"""Adapters on disk, in PEFT's format: adapter_config.json and
adapter_model.safetensors with PEFT's key names, so that adapters move between
pypeft and the `peft` package both ways. READ, which PEFT does not have, is
saved in the same two files in a format of pypeft's own (pypeft/read_format.py).

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

from pypeft.methods.modules_to_save import TrainableCopies
from pypeft import read_format
from pypeft.methods import read
from pypeft.models import task_type
from pypeft.models.linear import is_transposed
from pypeft.patch import (_base_dims, _require_state, find_modules_to_save, find_targets, patch, set_adapter,
                          state_of)
from pypeft.peft_formats import FORMAT_OF_PEFT_TYPE, FORMATS, PREFIX, VeraFormat

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be loaded: missing, corrupt, or for another model."""


# --- saving ---------------------------------------------------------------------

def _peft_config(model: nn.Module, config, layers: list[str], to_save: list[str]) -> dict:
    fmt = FORMATS[config.method]
    fan_in_fan_out = any(is_transposed(model.get_submodule(n).base_layer) for n in layers)
    return {
        "peft_type": fmt.peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        # The resolved module names: PEFT's suffix matching selects exactly these.
        "target_modules": layers,
        "modules_to_save": [n.rsplit(".", 1)[-1] for n in to_save] or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        **fmt.config_fields(config),
    }


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    state = _require_state(model, "save_adapter")
    record = state.adapters[adapter_name]
    if record.config.method == "read":
        tensors = read_format.network_tensors(state, adapter_name)
    else:
        fmt = FORMATS[record.config.method]
        tensors = dict(fmt.model_tensors(state, record.config))
        for name in record.layers:
            for suffix, value in fmt.layer_tensors(model.get_submodule(name), adapter_name).items():
                tensors[f"{PREFIX}{name}.{suffix}"] = value
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
    if record.config.method == "read":
        config = read_format.config_json(model, state, record.config, record.modules_to_save)
    else:
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
    if read_format.is_read_config(config):
        return config
    peft_type = config.get("peft_type")
    if peft_type not in FORMAT_OF_PEFT_TYPE:
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: expected peft_type one of "
                                 f"{sorted(FORMAT_OF_PEFT_TYPE)}, got {peft_type!r}")
    fmt = FORMAT_OF_PEFT_TYPE[peft_type]
    for key, expected in fmt.plain.items():
        got = config.get(key)
        if got is not None and got != expected:
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: option {key}={got!r} is not supported "
                                     f"by pypeft's {peft_type} (expected {expected!r})")
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


def _config_from_peft(fields: dict, adapter_name: str):
    try:
        return FORMAT_OF_PEFT_TYPE[fields["peft_type"]].config_from_peft(fields, adapter_name)
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {CONFIG_NAME}: {e}") from None


def _expected_shapes(model: nn.Module, config, layers: list[str], to_save: list[str]):
    fmt = FORMATS[config.method]
    shapes = {}
    for name in layers:
        for suffix, shape in fmt.layer_shapes(config, *_base_dims(model, name)).items():
            shapes[f"{PREFIX}{name}.{suffix}"] = shape
    return {**shapes, **_head_shapes(model, to_save)}


def _head_shapes(model: nn.Module, to_save: list[str]) -> dict[str, tuple]:
    shapes = {}
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


def _saved_projections(path: Path, model: nn.Module, config, layers: list[str],
                       tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """VeRA: the shared matrices saved with the adapter (checked against the
    layers and against the model's own, if it has VeRA adapters already), or
    None when the seed is to regenerate them."""
    if config.method != "vera":
        return None
    keys = VeraFormat.PROJECTION_KEYS
    if not all(k in tensors for k in keys):
        if config.save_projection:
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: save_projection is true but {keys[0]!r} / "
                                     f"{keys[1]!r} are missing")
        return None
    a, b = (tensors[k] for k in keys)
    dims = [_base_dims(model, n) for n in layers]
    need_in, need_out = max(d[0] for d in dims), max(d[1] for d in dims)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.r or b.shape[1] != config.r \
            or a.shape[1] < need_in or b.shape[0] < need_out:
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: shared matrices {keys[0]!r} {list(a.shape)} and "
                                 f"{keys[1]!r} {list(b.shape)}: expected [{config.r}, >={need_in}] and "
                                 f"[>={need_out}, {config.r}]")
    state = state_of(model)
    existing = state.vera_projections if state is not None else None
    if existing is not None:
        same = existing.vera_A.shape == a.shape and existing.vera_B.shape == b.shape and \
            torch.equal(existing.vera_A.cpu().to(a.dtype), a) and torch.equal(existing.vera_B.cpu().to(b.dtype), b)
        if not same:
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: its shared VeRA matrices differ from the ones "
                                     "the model's VeRA adapters share; every VeRA adapter on a model must share them")
    return a, b


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load an adapter saved by pypeft or `peft` (PEFT's LoRA or VeRA format).

    On an unpatched model this patches it and makes the adapter active; on a
    patched one it adds the adapter under `adapter_name` and leaves the active
    adapter as it was (as peft's load_adapter). Everything is checked before
    the model changes: a bad directory raises and loses nothing.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    peft_config = _read_config(directory)
    tensors = _read_weights(directory)
    _require_new_name(model, adapter_name)
    if read_format.is_read_config(peft_config):
        return _load_read(model, path, peft_config, tensors, adapter_name)
    config = _config_from_peft(peft_config, adapter_name)
    fmt = FORMATS[config.method]
    state = state_of(model)
    # PEFT lists every head name a task may have (["classifier", "score"]); keep those this model has.
    to_save = find_modules_to_save(model, config.modules_to_save or [], strict=False)
    layers = find_targets(model, config.target_modules, config.method, to_save)
    projections = _saved_projections(path, model, config, layers, tensors)
    shapes = _expected_shapes(model, config, layers, to_save)
    if projections is not None:
        shapes.update({k: tuple(tensors[k].shape) for k in VeraFormat.PROJECTION_KEYS})
    _check_tensors(path, tensors, shapes)
    config.modules_to_save = to_save  # what was saved, not the default head
    previous = state.active if state is not None else None
    patch(model, config)
    state = state_of(model)
    with torch.no_grad():
        if projections is not None:
            shared = state.vera_projections
            like = shared.vera_A
            shared.vera_A, shared.vera_B = (t.to(device=like.device, dtype=like.dtype) for t in projections)
        for name in layers:
            layer = model.get_submodule(name)
            for suffix, value in fmt.layer_tensors(layer, adapter_name).items():
                value.copy_(tensors[f"{PREFIX}{name}.{suffix}"])
        _load_heads(model, to_save, tensors, adapter_name)
    if previous is not None:
        set_adapter(model, previous)
    return model


def _require_new_name(model: nn.Module, adapter_name: str) -> None:
    state = state_of(model)
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"pypeft.load_adapter: argument 'adapter_name': adapter {adapter_name!r} exists "
                         f"already (adapters: {sorted(state.adapters)})")


def _load_heads(model: nn.Module, to_save: list[str], tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    for name in to_save:
        copy = model.get_submodule(name).copies[adapter_name]
        copy.load_state_dict({k[len(PREFIX) + len(name) + 1:]: v for k, v in tensors.items()
                              if k.startswith(f"{PREFIX}{name}.")})


def _load_read(model: nn.Module, path: Path, fields: dict, tensors: dict[str, torch.Tensor],
               adapter_name: str) -> nn.Module:
    """A READ adapter (pypeft's own format), checked against the model first."""
    try:
        config = read_format.config_from_json(fields, adapter_name)
        stack = read.final_stack_of(model)
        config.layer_indices(len(stack.layers))
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {path.parent / CONFIG_NAME}: {e}") from None
    saved = (fields.get("stack"), fields.get("stack_layers"), fields.get("width"))
    here = (stack.name, len(stack.layers), read.width_of(model, stack))
    if saved != here:
        raise AdapterFormatError(f"pypeft.load_adapter: {path.parent / CONFIG_NAME}: saved for a stack "
                                 f"(name, layers, width) = {saved}, but this model's is {here}")
    to_save = find_modules_to_save(model, config.modules_to_save or [], strict=False)
    _check_tensors(path, tensors, {**read_format.network_shapes(config, here[2]), **_head_shapes(model, to_save)})
    config.modules_to_save = to_save
    state = state_of(model)
    previous = state.active if state is not None else None
    patch(model, config)
    state = state_of(model)
    network = state.read.adapters.networks[adapter_name]
    prefix = read_format.NETWORK_PREFIX
    with torch.no_grad():
        network.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        _load_heads(model, to_save, tensors, adapter_name)
    if previous is not None:
        set_adapter(model, previous)
    return model
