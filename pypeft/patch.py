"""pypeft.patch(): adapt a model in place, and the rest of a patched model's
lifecycle (unpatch, merge, unmerge, disabled, set_adapter, delete_adapter).

What patch() did is recorded on the model (`model.pypeft`, a PatchState), so
that unpatch() restores the original modules and flags exactly, and saving
and loading know which adapters exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from pypeft.methods.adapted_linear import AdaptedLinear
from pypeft.methods.lora import LoraConfig, LoraLinear
from pypeft.methods import read, tokentune
from pypeft.methods.modules_to_save import TrainableCopies
from pypeft.methods.read import ReadAdapters, ReadConfig, ReadRecord
from pypeft.methods.tokentune import TokenTuneConfig, TokenTuneRecord
from pypeft.methods.vera import VeraConfig, VeraLinear, VeraProjections
from pypeft.models import classifier_head_names, default_lora_targets, is_linear_like, linear_dims, output_head_names

STATE_ATTR = "pypeft"

# method name -> its config class; the config names the method (config.method).
METHODS: dict[str, type] = {"lora": LoraConfig, "vera": VeraConfig, "tokentune": TokenTuneConfig,
                            "read": ReadConfig}
# method name -> the layer class that holds its adapters (TokenTune holds none:
# it changes how the model trains, composing with the adapter methods).
LAYERS: dict[str, type[AdaptedLinear]] = {"lora": LoraLinear, "vera": VeraLinear}

# Modules pypeft puts into a model; nothing inside them is a target.
_PYPEFT_LAYERS = (AdaptedLinear, TrainableCopies, ReadAdapters)


@dataclass
class AdapterRecord:
    config: Any                      # the method's config (e.g. LoraConfig)
    layers: list[str]                # names of the layers holding this adapter
    modules_to_save: list[str]       # names of the modules trained in full with it


@dataclass
class PatchState:
    replaced: dict[str, nn.Module] = field(default_factory=dict)   # name -> original module
    requires_grad: dict[str, bool] = field(default_factory=dict)   # parameter -> original flag
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: str | None = None
    merged: bool = False
    vera_projections: VeraProjections | None = None  # shared by every VeRA adapter of the model
    tokentune: TokenTuneRecord | None = None  # set by patch(method="tokentune")
    read: ReadRecord | None = None  # set by the first patch(method="read")


def state_of(model: nn.Module) -> PatchState | None:
    return model.__dict__.get(STATE_ATTR)


def _require_state(model: nn.Module, what: str) -> PatchState:
    state = state_of(model)
    if state is None:
        raise ValueError(f"pypeft.{what}: the model is not patched (call pypeft.patch first)")
    return state


# --- resolving what to adapt ----------------------------------------------------

def _owned_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, _PYPEFT_LAYERS)]


def _user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for the model's own modules, not the insides of pypeft layers."""
    owned = _owned_prefixes(model)
    for name, module in model.named_modules():
        if name and not any(name.startswith(p) for p in owned):
            yield name, module


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _describe_linear_layers(model: nn.Module) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, m in _user_modules(model)
                       if is_linear_like(m) or isinstance(m, AdaptedLinear)})
    return ", ".join(suffixes) if suffixes else "(none)"


def find_targets(model: nn.Module, target_modules, method: str, trained_in_full: list[str] = ()) -> list[str]:
    """Names of the linear layers `target_modules` selects (PEFT's rules).

    Layers inside modules trained in full (modules_to_save) are not adapted,
    as in PEFT."""
    if target_modules is None:
        target_modules = default_lora_targets(model)
        if target_modules is None:
            raise ValueError(
                f"pypeft.patch(method={method!r}): argument 'target_modules': no default for model type "
                f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}; pass a list of layer names, "
                f"a regex or 'all-linear'. Its linear layers are named: {_describe_linear_layers(model)}")
    inside_full = tuple(n + "." for n in trained_in_full)
    modules = {n: m for n, m in _user_modules(model) if n not in trained_in_full and not n.startswith(inside_full)}
    eligible = {n for n, m in modules.items() if is_linear_like(m) or isinstance(m, AdaptedLinear)}
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        heads = output_head_names(model)
        chosen = sorted(n for n in eligible if n not in heads)
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"pypeft.patch(method={method!r}): argument 'target_modules': {target_modules!r} "
                             f"is not a valid regular expression ({e})") from None
        chosen = sorted(n for n in eligible if pattern.fullmatch(n))
    else:
        keys = list(target_modules)
        for key in keys:
            wrong = [n for n, m in modules.items() if _name_matches(n, key) and n not in eligible]
            if wrong and not any(_name_matches(n, key) for n in eligible):
                raise ValueError(
                    f"pypeft.patch(method={method!r}): argument 'target_modules': {key!r} names "
                    f"{wrong[0]!r}, a {type(modules[wrong[0]]).__name__}; {method} adapts linear layers only")
        chosen = sorted(n for n in eligible if any(_name_matches(n, k) for k in keys))
    if not chosen:
        raise ValueError(
            f"pypeft.patch(method={method!r}): argument 'target_modules': {target_modules!r} matched no linear "
            f"layer of {type(model).__name__}; its linear layers are named: {_describe_linear_layers(model)}")
    return chosen


def find_modules_to_save(model: nn.Module, modules_to_save, strict: bool = True) -> list[str]:
    """Names of the modules trained in full; strict: every name must exist."""
    if modules_to_save is None:
        return classifier_head_names(model)
    names = [n for n, _ in _user_modules(model)]  # a wrapped module keeps its name
    chosen: list[str] = []
    for key in modules_to_save:
        hits = [n for n in names if _name_matches(n, key)]
        if not hits and strict:
            raise ValueError(f"pypeft.patch: argument 'modules_to_save': {key!r} names no module of "
                             f"{type(model).__name__}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


# --- patching -------------------------------------------------------------------

def _make_config(config, method, options, adapter_name):
    if isinstance(config, str):
        config, method = None, config
    if config is not None:
        if method is not None or options:
            raise ValueError("pypeft.patch: give either a config object or method= with options, not both")
        if not any(isinstance(config, cls) for cls in METHODS.values()):
            raise TypeError(f"pypeft.patch: argument 'config': expected one of "
                            f"{[c.__name__ for c in METHODS.values()]}, got {type(config).__name__}")
        if adapter_name is not None and isinstance(config, TokenTuneConfig):
            raise ValueError("pypeft.patch: argument 'adapter_name': TokenTune holds no adapter")
        return config if adapter_name is None else dataclasses.replace(config, adapter_name=adapter_name)
    if method not in METHODS:
        raise ValueError(f"pypeft.patch: argument 'method': expected one of {sorted(METHODS)}, got {method!r}")
    cls = METHODS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"pypeft.patch(method={method!r}): unknown option {unknown[0]!r}; "
                         f"options: {', '.join(sorted(known))}")
    if adapter_name is not None:
        if cls is TokenTuneConfig:
            raise ValueError("pypeft.patch(method='tokentune'): argument 'adapter_name': TokenTune holds no adapter "
                             f"(it changes how the model trains), got {adapter_name!r}")
        options["adapter_name"] = adapter_name
    return cls(**options)


def patch(model: nn.Module, config=None, *, method: str | None = None, adapter_name: str | None = None,
          **options) -> nn.Module:
    """Patch `model` in place with a PEFT method and return it.

        pypeft.patch(model, method="lora", r=8, alpha=16, dropout=0.1)
        pypeft.patch(model, pypeft.LoraConfig(r=8, alpha=16))

    All base parameters are frozen; the new adapter (and the modules it trains
    in full, by default a sequence classifier's head) is trainable and active.
    Patching again with another adapter_name adds an adapter; a name in use
    raises.

        pypeft.patch(model, method="tokentune", k=16)   # or fraction=0.25

    TokenTune composes: alone, the model trains all its weights as before;
    with LoRA or VeRA adapters (patched before or after), only those; either
    way backward runs through k tokens per sequence (see TokenTuneConfig).

        pypeft.patch(model, method="read", rnn="gru", hidden=256)

    READ runs the frozen backbone under no_grad and trains a small RNN over
    its layers (see pypeft/methods/read.py); it does not compose with the
    methods that train inside the backbone.
    """
    config = _make_config(config, method, dict(options), adapter_name)
    _check_composes(state_of(model), config.method)
    if config.method == "tokentune":
        return _patch_tokentune(model, config)
    state = state_of(model)
    name = config.adapter_name
    if state is not None and name in state.adapters:
        raise ValueError(f"pypeft.patch: argument 'adapter_name': adapter {name!r} exists already "
                         f"(adapters: {sorted(state.adapters)}); choose another name or delete_adapter first")
    if state is not None and state.merged:
        raise ValueError("pypeft.patch: the model has merged adapters; call pypeft.unmerge(model) first")
    if config.method == "read":
        return _patch_read(model, config)
    # Resolve everything before changing anything: a bad argument loses nothing.
    to_save = find_modules_to_save(model, config.modules_to_save)
    targets = find_targets(model, config.target_modules, config.method, to_save)
    _check_one_method_per_layer(model, targets, config.method)
    projections = _vera_projections(model, state, config, targets) if config.method == "vera" else None
    state = _ensure_state(model)
    _freeze_base(model, state)
    layer_class = LAYERS[config.method]
    for target in targets:
        layer = _wrapped(model, state, target, layer_class)
        if config.method == "lora":
            layer.add_adapter(name, config.r, config.alpha, config.dropout, config.rslora)
        else:
            layer.add_adapter(name, projections, config.d_initial, config.dropout)
    state.vera_projections = projections or state.vera_projections
    for target in to_save:
        _wrapped(model, state, target, TrainableCopies).add_adapter(name)
    state.adapters[name] = AdapterRecord(config=config, layers=targets, modules_to_save=to_save)
    _activate(model, state, name)
    if state.tokentune is not None:
        tokentune.tag_new_layers(model, state.tokentune)
    return model


def _ensure_state(model: nn.Module) -> PatchState:
    """The model's PatchState, made (recording requires_grad flags) on first use."""
    state = state_of(model)
    if state is None:
        state = PatchState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = state
    return state


def _check_composes(state: PatchState | None, method: str) -> None:
    """READ keeps autograd out of the backbone; the other methods train inside it."""
    if state is None:
        return
    methods = {r.config.method for r in state.adapters.values()} | ({"tokentune"} if state.tokentune else set())
    clash = sorted(m for m in methods if (m == "read") != (method == "read"))
    if clash:
        raise ValueError(f"pypeft.patch(method={method!r}): the model is patched with {clash[0]} already; READ runs "
                         "the backbone without autograd and does not compose with methods that train inside it "
                         "(pypeft.unpatch(model) first)")


def _freeze_base(model: nn.Module, state: PatchState) -> None:
    if not state.adapters:  # the first adapter: the base stops training
        for p in model.parameters():
            p.requires_grad_(False)


def _patch_read(model: nn.Module, config: ReadConfig) -> nn.Module:
    # Resolve everything before changing anything: a bad argument loses nothing.
    state = state_of(model)
    to_save = find_modules_to_save(model, config.modules_to_save)
    record = state.read if state is not None else None
    stack = record.stack if record is not None else read.final_stack_of(model)
    layers = config.layer_indices(len(stack.layers))
    state = _ensure_state(model)
    _freeze_base(model, state)
    record = state.read = record or read.attach(model)
    like = next(stack.module.parameters())
    record.adapters.add_adapter(config.adapter_name, config, layers, read.network_dtype(model), like.device)
    for target in to_save:
        _wrapped(model, state, target, TrainableCopies).add_adapter(config.adapter_name)
    state.adapters[config.adapter_name] = AdapterRecord(config=config, layers=[stack.name],
                                                        modules_to_save=to_save)
    _activate(model, state, config.adapter_name)
    return model


def _patch_tokentune(model: nn.Module, config: TokenTuneConfig) -> nn.Module:
    state = state_of(model)
    if state is not None and state.tokentune is not None:
        raise ValueError("pypeft.patch(method='tokentune'): the model is patched with TokenTune already; "
                         "pypeft.unpatch(model) first to change its options")
    record = tokentune.attach(model, config)  # checks everything before it changes anything
    _ensure_state(model).tokentune = record
    return model


def _check_one_method_per_layer(model: nn.Module, targets: list[str], method: str) -> None:
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLinear) and module.method != method:
            raise ValueError(f"pypeft.patch(method={method!r}): layer {name!r} holds {module.method} adapters; "
                             "a layer takes adapters of one method (choose other target_modules)")


def _base_dims(model: nn.Module, name: str) -> tuple[int, int]:
    module = model.get_submodule(name)
    return linear_dims(module.base_layer if isinstance(module, AdaptedLinear) else module)


def _vera_projections(model: nn.Module, state: PatchState | None, config: VeraConfig,
                      targets: list[str]) -> VeraProjections:
    """The model's shared VeRA matrices: the existing ones, if they fit this
    adapter, or new ones sized by its largest layer."""
    dims = {name: _base_dims(model, name) for name in targets}
    existing = state.vera_projections if state is not None else None
    if existing is not None:
        existing.check_compatible(config, dims, "pypeft.patch(method='vera')")
        return existing
    like = _base_layer_weight(model.get_submodule(targets[0]))
    return VeraProjections.for_layers(config, list(dims.values()), like)


def _base_layer_weight(module: nn.Module):
    return (module.base_layer if isinstance(module, AdaptedLinear) else module).weight


def _wrapped(model: nn.Module, state: PatchState, name: str, wrapper: type) -> nn.Module:
    """The pypeft layer at `name`, wrapping the original module there first if
    needed (the original is recorded, for unpatch)."""
    module = model.get_submodule(name)
    if not isinstance(module, wrapper):
        state.replaced[name] = module
        module = wrapper(module)
        model.set_submodule(name, module)
    return module


def _pypeft_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, _PYPEFT_LAYERS))


def _adapted_layers(model: nn.Module) -> Iterator[AdaptedLinear]:
    return (m for m in model.modules() if isinstance(m, AdaptedLinear))


def _activate(model: nn.Module, state: PatchState, name: str | None) -> None:
    """Make `name` the adapter that runs and trains; the others are frozen."""
    for layer in _pypeft_layers(model):
        layer.activate(name)
    state.active = name


# --- the rest of the lifecycle ---------------------------------------------------

def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): the original modules, weights and requires_grad flags."""
    state = _require_state(model, "unpatch")
    unmerge(model)
    if state.tokentune is not None:
        tokentune.detach(model, state.tokentune)
    if state.read is not None:
        read.detach(state.read)
    for name, original in state.replaced.items():
        model.set_submodule(name, original)
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    del model.__dict__[STATE_ATTR]
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (forward then runs the
    plain layers). unmerge() takes it out again."""
    state = _require_state(model, "merge")
    if state.active is not None and state.adapters[state.active].config.method == "read":
        raise ValueError("pypeft.merge: the active adapter is READ's, whose correction (an RNN over the layers) "
                         "cannot be folded into the base weights")
    for layer in _adapted_layers(model):
        layer.merge()
    state.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    state = _require_state(model, "unmerge")
    for layer in _adapted_layers(model):
        layer.unmerge()
    state.merged = False
    return model


@contextlib.contextmanager
def _unmerged(model: nn.Module, state: PatchState):
    """Take merged adapters out of the base weights for the block, then put
    the (then active) adapter back in."""
    was_merged = state.merged
    if was_merged:
        unmerge(model)
    try:
        yield
    finally:
        if was_merged:
            merge(model)


def _require_adapter(state: PatchState, name: str, what: str) -> None:
    if name not in state.adapters:
        raise ValueError(f"pypeft.{what}: argument 'name': expected one of {sorted(state.adapters)}, got {name!r}")


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: inside the block, no adapter (and no trained copy of
    a module) takes part. Merged adapters are taken out and put back."""
    state = _require_state(model, "disabled")
    with _unmerged(model, state):
        layers = list(_pypeft_layers(model))
        for layer in layers:
            layer.disabled = True
        try:
            yield model
        finally:
            for layer in layers:
                layer.disabled = False


def set_adapter(model: nn.Module, name: str) -> None:
    state = _require_state(model, "set_adapter")
    _require_adapter(state, name, "set_adapter")
    with _unmerged(model, state):
        _activate(model, state, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    state = _require_state(model, "delete_adapter")
    _require_adapter(state, name, "delete_adapter")
    if len(state.adapters) == 1:
        raise ValueError(f"pypeft.delete_adapter: {name!r} is the only adapter; call pypeft.unpatch(model) "
                         "to remove it and restore the model")
    with _unmerged(model, state):
        for layer in _pypeft_layers(model):
            if layer.has_adapter(name):
                layer.delete_adapter(name)
        del state.adapters[name]
        if not any(r.config.method == "vera" for r in state.adapters.values()):
            state.vera_projections = None
        if state.active == name:
            _activate(model, state, next(iter(state.adapters)))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's print_trainable_parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
