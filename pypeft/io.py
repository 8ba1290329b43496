"""Adapters on disk: adapter_config.json and adapter_model.safetensors, in
each method's format (PEFT's for the methods peft has, so that adapters move
between pypeft and `peft` both ways; pypeft's own beside them otherwise).
This module reads, checks (keys, shapes, floating dtypes) and writes the two
files for every method alike; the method (pypeft/registry.py) says what goes
into them. The modules trained in full beside an adapter are stored under
PEFT's keys, "<method.head_prefix><module>.<key>" ("base_model.model." for
most methods; peft's prompt-learning methods write "base_model.").

Saving is atomic per file (written and synced under a temporary name, then
renamed over the old one). The two files cannot be renamed as one, so the
weights also record the config they were saved with (in the safetensors
metadata, which peft ignores): a crash between the two renames leaves new
weights beside an old config, and load_adapter refuses such a pair, naming
the field that differs, instead of loading the weights under the wrong
options. Fields that do not touch the math (peft's bookkeeping, e.g.
base_model_name_or_path) may differ, so a config edited by hand still loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: nothing is sharded (isinstance(x, ()) is False)
    DTensor = ()

from pypeft.methods.peft_fields import METADATA
from pypeft.modules_to_save import TrainableCopies
from pypeft.patch import attach, plan as plan_patch, set_adapter
from pypeft.registry import Method, methods
from pypeft.state import require_state, state_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAVED_CONFIG_KEY = "pypeft.adapter_config"  # in the weights' safetensors metadata: the config they go with


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be loaded: missing, corrupt, or for another model."""


# --- saving ---------------------------------------------------------------------

def _head_tensors(model: nn.Module, to_save: list[str], adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in to_save:
        copy = model.get_submodule(name).copies[adapter_name]
        for key, value in copy.state_dict().items():
            tensors[f"{prefix}{name}.{key}"] = value
    return tensors


def _method_of_adapter(state, name: str) -> Method:
    return methods()[state.adapters[name].config.method]


def adapter_state_dict(model: nn.Module, adapter_name: str, gather: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys its format stores them with.
    gather: sharded tensors (DTensors: FSDP2 returns them from state_dict()
    even while unsharded) are gathered in full, a collective every rank must
    join in the same order (pypeft.distributed); else they raise."""
    state = require_state(model, "save_adapter")
    method = _method_of_adapter(state, adapter_name)
    _, tensors = method.to_disk(model, state, adapter_name)
    tensors.update(_head_tensors(model, state.adapters[adapter_name].modules_to_save, adapter_name,
                                 method.head_prefix))
    for key, value in tensors.items():
        if isinstance(value, DTensor) and gather:
            tensors[key] = value.full_tensor()
        elif isinstance(value, DTensor):  # a shard: gathering it is a collective every rank must join
            raise ValueError(f"pypeft.save_adapter: tensor {key!r} is sharded (a DTensor, e.g. under FSDP2's "
                             "fully_shard); call pypeft.distributed.save_adapter(model, directory) on every rank")
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_atomically(directory: Path, files: dict[str, callable]) -> None:
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


def _config_bytes(fields: dict) -> bytes:
    return json.dumps(fields, indent=2, sort_keys=True).encode()


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter (default: the active one) to `directory`, in its
    method's format (PEFT's for the methods peft has). A model sharded by
    FSDP2: pypeft.distributed.save_adapter on every rank."""
    directory, files = adapter_files(model, directory, adapter_name)
    write_atomically(directory, files)
    return directory


def _adapter_named(state, adapter_name: str | None, owner: str) -> str:
    """The adapter a call names (default: the active one), which the model must hold."""
    name = adapter_name or state.active
    if name not in state.adapters:
        raise ValueError(f"{owner}: argument 'adapter_name': expected one of {sorted(state.adapters)}, "
                         f"got {name!r}")
    return name


def adapter_files(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                  gather: bool = False) -> tuple[Path, dict]:
    """save_adapter's checked directory and the files it writes (name ->
    writer(path)); gather: as adapter_state_dict's, for every rank's part of a
    distributed save."""
    state = require_state(model, "save_adapter")
    name = _adapter_named(state, adapter_name, "pypeft.save_adapter")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"pypeft.save_adapter: argument 'directory': expected a directory (an adapter is two "
                         f"files), got {str(directory)!r}, which is a file")
    method = _method_of_adapter(state, name)
    with state.lock:
        fields, _ = method.to_disk(model, state, name)
        tensors = adapter_state_dict(model, name, gather)
    config = _config_bytes(fields)
    metadata = {"format": "pt", SAVED_CONFIG_KEY: config.decode()}

    def write_config(path):
        with open(path, "wb") as f:
            f.write(config)

    def write_weights(path):
        save_file(tensors, path, metadata=metadata)

    head_keys = {f"{method.head_prefix}{n}." for n in state.adapters[name].modules_to_save}
    heads = {k[len(method.head_prefix):]: v for k, v in tensors.items() if k.startswith(tuple(head_keys))}
    extra = method.extra_files(model, state, name, heads)
    # Weights first, config last: the config is what marks a directory as an adapter.
    return directory, {**extra, method.weights_names[0]: write_weights, method.config_name: write_config}


# --- loading --------------------------------------------------------------------

def _config_names() -> list[str]:
    """The config file names of the registered formats, pypeft/peft's first."""
    return list(dict.fromkeys([CONFIG_NAME, *(m.config_name for m in methods().values())]))


def _read_config(directory: Path) -> tuple[Path, dict]:
    path = next((directory / n for n in _config_names() if (directory / n).is_file()), None)
    if path is None:
        raise AdapterFormatError(f"pypeft.load_adapter: no {' or '.join(_config_names())} in {directory}")
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"pypeft.load_adapter: {path} holds no JSON object")
    return path, config


def _method_for(path: Path, fields: dict) -> Method:
    found = [m for m in methods().values() if m.config_name == path.name and m.recognises(fields)]
    if found:
        return found[0]
    hints = "; ".join(m.format_hint() for m in methods().values() if m.config_name == path.name and m.holds_adapters)
    raise AdapterFormatError(f"pypeft.load_adapter: {path}: no format pypeft reads matches its content "
                             f"(expected one of: {hints}; got peft_type={fields.get('peft_type')!r})")


def _read_weights(directory: Path, method: Method) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    names = method.weights_names
    path = next((directory / n for n in names if (directory / n).is_file()), None)
    if path is None:
        other = " (only the older adapter_model.bin is there; re-save it with peft as safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"pypeft.load_adapter: no {' or '.join(names)} in {directory}{other}")
    try:
        if path.suffix == ".bin":  # a pickle: only plain tensors, never code
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                raise ValueError("expected a dict of tensors")
            return path, tensors, {}
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return path, load_file(path), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterFormatError(f"pypeft.load_adapter: {path} is corrupt or truncated, or holds more than "
                                 f"tensors ({reason})") from None


def _check_saved_together(method: Method, path: Path, config_path: Path, fields: dict,
                          metadata: dict[str, str]) -> None:
    """The weights were saved with this config (up to bookkeeping fields)."""
    recorded = metadata.get(SAVED_CONFIG_KEY)
    if recorded is None:  # saved by peft, or by hand
        return
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: its record of the config it was saved with is "
                                 "damaged")
    try:
        saved = method.comparable(saved)
    except (KeyError, ValueError, TypeError):
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: its record of the config it was saved with is "
                                 "damaged") from None
    fields = method.comparable(fields)
    for key in sorted((set(saved) | set(fields)) - METADATA):
        if saved.get(key) != fields.get(key):
            raise AdapterFormatError(
                f"pypeft.load_adapter: {path.parent}: {path.name} was saved with {key}={saved.get(key)!r} but "
                f"{config_path.name} says {key}={fields.get(key)!r}; the two files do not belong together (a save "
                "interrupted between them?); save the adapter again")


def _head_shapes(model: nn.Module, to_save: list[str], prefix: str) -> dict[str, tuple]:
    shapes = {}
    for name in to_save:
        module = model.get_submodule(name)
        source = module.original_module if isinstance(module, TrainableCopies) else module
        for key, value in source.state_dict().items():
            shapes[f"{prefix}{name}.{key}"] = tuple(value.shape)
    return shapes


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    for key, shape in shapes.items():
        if key not in tensors:
            raise AdapterFormatError(f"pypeft.load_adapter: {path} has no tensor {key!r}; it was saved for "
                                     "another model or other target modules")
        if tuple(tensors[key].shape) != shape:
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: tensor {key!r}: expected shape "
                                     f"{list(shape)}, got {list(tensors[key].shape)} (an adapter for another model?)")
        if not tensors[key].is_floating_point():
            raise AdapterFormatError(f"pypeft.load_adapter: {path}: tensor {key!r}: expected a floating dtype, "
                                     f"got {tensors[key].dtype}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: tensor {extra[0]!r} belongs to no module of "
                                 "this model")


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load an adapter saved by pypeft or `peft` (in PEFT's format for the methods peft has,
    or a format of pypeft's own).

    On an unpatched model this patches it and makes the adapter active; on a
    patched one it adds the adapter under `adapter_name` and leaves the active
    adapter as it was (as peft's load_adapter). Everything is checked before
    the model changes: a bad directory raises and loses nothing. The new
    layers take the training flag of what they replace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pypeft.load_adapter: argument 'model': expected a torch.nn.Module, "
                        f"got {type(model).__name__}")
    directory = Path(directory)
    config_path, fields = _read_config(directory)
    method = _method_for(config_path, fields)
    try:
        config = method.config_from_disk(fields, adapter_name)
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {config_path}: {e}") from None
    path, tensors, metadata = _read_weights(directory, method)
    _check_saved_together(method, path, config_path, fields, metadata)
    try:
        heads = method.heads_from_disk(directory, fields, model)
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {directory}: its head files are unreadable ({e})") from None
    if heads:  # the format's own head files: trained in full beside the adapter, as modules_to_save
        config = dataclasses.replace(config, modules_to_save=sorted({k.split(".")[0] for k in heads}))
        tensors = {**tensors, **{method.head_prefix + k: v for k, v in heads.items()}}
    state = state_of(model)
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"pypeft.load_adapter: argument 'adapter_name': adapter {adapter_name!r} exists "
                         f"already (adapters: {sorted(state.adapters)})")
    plan = plan_patch(model, config)
    try:
        shapes = method.expected_tensors(model, state, plan, fields, tensors)
    except ValueError as e:
        raise AdapterFormatError(f"pypeft.load_adapter: {path}: {e}") from None
    _check_tensors(path, tensors, {**shapes, **_head_shapes(model, plan.modules_to_save, method.head_prefix)})
    previous = state.active if state is not None else None
    attach(model, plan)
    state = state_of(model)
    with torch.no_grad():
        method.load_tensors(model, state, plan, tensors)
        for name in plan.modules_to_save:
            copy = model.get_submodule(name).copies[adapter_name]
            prefix = f"{method.head_prefix}{name}."
            copy.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if previous is not None:
        set_adapter(model, previous)
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Copy the weights saved in `directory` into adapter `adapter_name`
    (default: the active one), which the model holds already, in place: the
    parameters stay the same objects (an optimizer built over them keeps
    them), as resuming from a checkpoint needs. The files must be of the
    adapter's method and fit it (the same checks as load_adapter); a bad
    directory raises and changes nothing."""
    state = require_state(model, "load_adapter_weights")
    name = _adapter_named(state, adapter_name, "pypeft.load_adapter_weights")
    directory = Path(directory)
    config_path, fields = _read_config(directory)
    method = _method_for(config_path, fields)
    current = state.adapters[name]
    if method.name != current.config.method:
        raise AdapterFormatError(f"pypeft.load_adapter_weights: {config_path}: expected an adapter of method "
                                 f"{current.config.method!r} (adapter {name!r}), got one of {method.name!r}")
    path, tensors, metadata = _read_weights(directory, method)
    _check_saved_together(method, path, config_path, fields, metadata)
    # The adapter's own config re-planned (the method's plan, not patch.plan, which refuses a name in use):
    # the files are checked against what the model holds, not against what they say.
    plan = method.plan(model, state, current.config)
    try:
        shapes = method.expected_tensors(model, state, plan, fields, tensors)
    except ValueError as e:
        raise AdapterFormatError(f"pypeft.load_adapter_weights: {path}: {e}") from None
    _check_tensors(path, tensors, {**shapes, **_head_shapes(model, current.modules_to_save, method.head_prefix)})
    with state.lock, torch.no_grad():
        method.load_tensors(model, state, plan, tensors)
        for module in current.modules_to_save:
            copy = model.get_submodule(module).copies[name]
            prefix = f"{method.head_prefix}{module}."
            copy.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
