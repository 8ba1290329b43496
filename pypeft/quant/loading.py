"""Quantised models that never hold their full-precision weights at once (the
way a 7B model fits where its 16-bit weights do not):

- from_pretrained(cls, path): a safetensors checkpoint, read one tensor at a
  time. A full-precision checkpoint is quantised layer by layer as it
  arrives (the same codes as loading it whole and calling pypeft.quantize);
  a transformers + bitsandbytes NF4 checkpoint (or pypeft's own save) is
  loaded as it is stored, bit for bit.
- from_config(cls, config): random weights, initialised as transformers
  initialises them and quantised layer by layer (benchmarks of large shapes
  without a checkpoint).

Both build the model with its parameters on the meta device (buffers such
as rotary tables are computed for real, as transformers 4 did with
accelerate's init_empty_weights(include_buffers=False)), put NF4Linear shells
where quantize() would quantise, then fill module by module: at most one
layer's full-precision weight exists at a time.

Limits: safetensors checkpoints only (model.safetensors or a sharded index);
the checkpoint's keys must be the model's names (transformers' key renames
for legacy checkpoints are not applied; a base-model checkpoint loaded into
a model with a head is not re-prefixed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Iterator

import torch
from torch import nn

from pypeft.quant import bnb_format, hf_config, targets
from pypeft.quant.nf4_linear import NF4Linear, _is_conv1d, check_blocksize, check_compute_dtype

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


# --- building the empty model -------------------------------------------------------------

@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside the block get their parameters on the meta
    device and their buffers on the CPU (nn.Module.register_parameter is
    patched for the block: not thread-safe, as accelerate's equivalent)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build(model_class, config, dtype: torch.dtype | None) -> nn.Module:
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        # The model is built plain and quantised by pypeft, not by transformers' bnb path.
        del config.quantization_config
    kwargs = {} if dtype is None else {"dtype": dtype}
    with params_on_meta():
        if hasattr(model_class, "_from_config"):
            model = model_class._from_config(config, **kwargs)
        else:  # an Auto class
            model = model_class.from_config(config, **kwargs)
    return model


def _shell(linear: nn.Module, blocksize: int, double_quant: bool, compute_dtype) -> NF4Linear:
    w = linear.weight
    conv = _is_conv1d(linear)
    in_features, out_features = (w.shape[0], w.shape[1]) if conv else (w.shape[1], w.shape[0])
    shell = NF4Linear(in_features, out_features, linear.bias is not None, blocksize=blocksize,
                      double_quant=double_quant, compute_dtype=compute_dtype or w.dtype, weight_dtype=w.dtype,
                      from_conv1d=conv, device="meta")
    shell.train(linear.training)
    return shell


def _install_shells(model: nn.Module, chosen, blocksize, double_quant, compute_dtype) -> None:
    for c in chosen:
        model.set_submodule(c.path, _shell(c.module, blocksize, double_quant, compute_dtype))


def _check_options(owner: str, dtype, compute_dtype, double_quant, blocksize, skip, device) -> torch.device:
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{owner}: argument 'dtype': expected a floating-point torch.dtype or None, got {dtype!r}")
    check_compute_dtype(compute_dtype, owner, allow_none=True)
    if not isinstance(double_quant, bool):
        raise TypeError(f"{owner}: argument 'double_quant': expected a bool, got {double_quant!r}")
    check_blocksize(blocksize, owner)
    if skip is not None and (isinstance(skip, str) or not all(isinstance(s, str) for s in skip)):
        raise TypeError(f"{owner}: argument 'skip': expected a list of module names or patterns, got {skip!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{owner}: argument 'device': expected a torch device, got {device!r}") from e


def _finish(model: nn.Module, chosen_names, double_quant, compute_dtype) -> nn.Module:
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still:
        raise ValueError(f"pypeft.quant: no values for {len(still)} tensor(s) of the model: "
                         f"{', '.join(still[:8])}{' ...' if len(still) > 8 else ''}")
    chosen_names = list(chosen_names)
    left = [c.name for c in targets.candidates(model)]
    dtype = compute_dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    hf_config.record(model, hf_config.bnb_config(double_quant, dtype,
                                                 hf_config.skip_patterns(left, chosen_names, targets.matches)))
    return model.eval()


# --- from a checkpoint -----------------------------------------------------------------------

# safetensors' dtype names (the format's header, https://github.com/huggingface/safetensors).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsFile:
    """One safetensors file, each tensor read into memory of its own when
    asked for. Not safe_open: its memory map leaves every page it touched
    resident in the process (page cache, but counted in its RSS), so a
    streamed load would peak at the file's size after all."""

    def __init__(self, path: str, stack: contextlib.ExitStack):
        self.file = stack.enter_context(open(path, "rb"))
        size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(size))
        self.header.pop("__metadata__", None)
        self.base = 8 + size
        self.path = path

    def get(self, key: str) -> torch.Tensor:
        info = self.header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise bnb_format.FormatError(f"pypeft.quant.from_pretrained: '{key}' in {self.path}: expected one of "
                                         f"{sorted(_ST_DTYPES)} as dtype, got {info['dtype']!r}")
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        buffer = bytearray(end - start)
        self.file.seek(self.base + start)
        if self.file.readinto(buffer) != len(buffer):
            raise bnb_format.FormatError(f"pypeft.quant.from_pretrained: '{key}' in {self.path}: the file ends "
                                         "before the tensor's bytes")
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(info["shape"])


class _Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards), read one at a time."""

    def __init__(self, directory: str, stack: contextlib.ExitStack):
        index = os.path.join(directory, SAFE_INDEX)
        single = os.path.join(directory, SAFE_WEIGHTS)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single):
            files = [SAFE_WEIGHTS]
        else:
            raise FileNotFoundError(f"pypeft.quant.from_pretrained: argument 'path': expected a directory with "
                                    f"{SAFE_WEIGHTS} or {SAFE_INDEX}, got {directory!r}")
        self.files = {f: _SafetensorsFile(os.path.join(directory, f), stack) for f in files}
        self.where = {key: name for name, file in self.files.items() for key in file.header}

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get(key)


def from_pretrained(model_class, path, *, dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
                    double_quant: bool = True, blocksize: int = 64, skip=None, device="cpu") -> nn.Module:
    """The model at `path` (a directory save_pretrained wrote) with NF4 linear
    layers, loaded one tensor at a time.

    model_class: a transformers model class or Auto class
    (AutoModelForCausalLM, LlamaForCausalLM, ...). dtype: of the layers kept
    in full precision and of the weights quantised (default: the
    checkpoint's). A bitsandbytes NF4 checkpoint keeps its own layers,
    blocksize and double quantisation, and its bnb_4bit_compute_dtype
    unless compute_dtype is given; otherwise double_quant, blocksize, skip
    and compute_dtype are pypeft.quantize's.
    """
    owner = "pypeft.quant.from_pretrained"
    device = _check_options(owner, dtype, compute_dtype, double_quant, blocksize, skip, device)
    from transformers import AutoConfig
    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    stored_config = getattr(config, "quantization_config", None)
    with contextlib.ExitStack() as stack:
        checkpoint = _Checkpoint(path, stack)
        keys = set(checkpoint.keys())
        if dtype is None:
            dtype = _config_dtype(config)
        model = _build(model_class, config, dtype)
        marker = ".weight." + bnb_format.QUANT_STATE_KEY
        prequantized = {k.split(marker)[0] for k in keys if marker in k}
        if prequantized:
            fp4 = sorted(k for k in keys if k.endswith(bnb_format.QUANT_STATE_KEY + "fp4"))
            if fp4:
                raise bnb_format.FormatError(f"{owner}: argument 'path': a bitsandbytes FP4 checkpoint ({fp4[0]}, "
                                             "...); pypeft reads NF4 only")
            if compute_dtype is None and stored_config is not None:
                compute_dtype = _dtype_of(hf_config.field(stored_config, "bnb_4bit_compute_dtype"))
            double_quant = bool(hf_config.field(stored_config, "bnb_4bit_use_double_quant")) if stored_config \
                else double_quant
            by_name = {c.name: c for c in targets.candidates(model)}
            missing = sorted(prequantized - set(by_name))
            if missing:
                raise bnb_format.FormatError(f"{owner}: the checkpoint holds 4-bit layers the model has no linear "
                                             f"layer for: {', '.join(missing[:8])}")
            chosen = [by_name[n] for n in sorted(prequantized)]
        else:
            selection = targets.select(model, skip)
            if selection.odd:
                import warnings
                warnings.warn(f"{owner}: {len(selection.odd)} linear layer(s) with an odd in_features stay in full "
                              f"precision: {', '.join(selection.odd)}", stacklevel=2)
            chosen = selection.chosen
        _install_shells(model, chosen, blocksize, double_quant, compute_dtype)
        _fill_from_checkpoint(model, checkpoint, keys, device)
    return _finish(model, [c.name for c in chosen], double_quant, compute_dtype)


def _fill_from_checkpoint(model: nn.Module, checkpoint: _Checkpoint, keys: set[str], device: torch.device) -> None:
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, NF4Linear):
            own = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
            state = {}
            for local, key in own.items():
                t = checkpoint.get(key)
                if local in ("weight", "bias") and t.is_floating_point():
                    t = t.to(module.weight_dtype)  # quantised from the model's dtype, as a normal load then quantize
                state[local] = t.to(device)
            module.load_state_dict(state, strict=True)
            continue
        for local, old in list(module._parameters.items()):
            if old is not None and prefix + local in keys:
                module._parameters[local] = nn.Parameter(_read(checkpoint, prefix + local, old, device),
                                                         requires_grad=old.requires_grad)
        for local, old in list(module._buffers.items()):
            if old is not None and local not in module._non_persistent_buffers_set and prefix + local in keys:
                module._buffers[local] = _read(checkpoint, prefix + local, old, device)
            elif old is not None and old.device != device and not old.is_meta:
                module._buffers[local] = old.to(device)


def _read(checkpoint: _Checkpoint, key: str, like: torch.Tensor, device) -> torch.Tensor:
    t = checkpoint.get(key)
    if tuple(t.shape) != tuple(like.shape):
        raise bnb_format.FormatError(f"pypeft.quant.from_pretrained: '{key}': expected shape {list(like.shape)}, "
                                     f"got {list(t.shape)}")
    return t.to(device, like.dtype if t.is_floating_point() else t.dtype)


def _dtype_of(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else None
    return None


def _config_dtype(config) -> torch.dtype:
    return _dtype_of(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)) or torch.float32


# --- random weights ----------------------------------------------------------------------------

@torch.no_grad()
def from_config(model_class, config, *, dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
                double_quant: bool = True, blocksize: int = 64, skip=None, device="cpu") -> nn.Module:
    """A model of `config` with random weights, initialised by the model's own
    _init_weights and quantised a block at a time: the modules holding linear
    layers (an attention, an MLP) are made in full precision one by one,
    initialised children first as transformers' initialize_weights does (so
    what a parent's init does to its linear layers, such as GPT-2's scaled
    c_proj, holds), and those layers quantised before the next block is made.
    torch.manual_seed first for reproducible weights (they are drawn in
    another order than transformers' own init: the same distributions, not
    the same numbers). Options as pypeft.quantize; dtype default float32."""
    owner = "pypeft.quant.from_config"
    device = _check_options(owner, dtype, compute_dtype, double_quant, blocksize, skip, device)
    model = _build(model_class, config, dtype or torch.float32)
    selection = targets.select(model, skip)
    if selection.odd:
        import warnings
        warnings.warn(f"{owner}: {len(selection.odd)} linear layer(s) with an odd in_features stay in full "
                      f"precision: {', '.join(selection.odd)}", stacklevel=2)
    init = getattr(model, "_init_weights", None)
    blocks: dict[str, list] = {}
    for c in selection.chosen:
        blocks.setdefault(c.path.rpartition(".")[0], []).append(c)
    for parent_path, chosen in blocks.items():
        parent = model.get_submodule(parent_path)
        # Only the parent's own tensors and its chosen linear layers are made
        # here (a parent may be the whole model, when its head is quantised).
        for c in chosen:
            for module in _children_first(c.module):
                if _materialize(module, device) and init is not None:
                    init(module)
        _materialize(parent, device)
        if init is not None:
            init(parent)
        for c in chosen:
            model.set_submodule(c.path, NF4Linear.from_linear(c.module, blocksize=blocksize,
                                                              double_quant=double_quant, compute_dtype=compute_dtype))
            c.module = None  # the full-precision weights go now
    for module in _children_first(model):
        if _materialize(module, device) and init is not None:
            init(module)
    return _finish(model, [c.name for c in selection.chosen], double_quant, compute_dtype)


def _children_first(module: nn.Module) -> list[nn.Module]:
    out = []
    for child in module.children():
        out.extend(_children_first(child))
    out.append(module)
    return out


def _materialize(module: nn.Module, device) -> bool:
    """Give the module's own meta tensors storage on `device` (uninitialised);
    whether it had any."""
    made = False
    for local, p in list(module._parameters.items()):
        if p is not None and p.is_meta:
            module._parameters[local] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            made = True
    for local, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[local] = torch.empty_like(b, device=device)
            made = True
        elif b is not None and b.device != device:
            module._buffers[local] = b.to(device)
    return made
