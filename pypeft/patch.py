"""pypeft.patch(): adapt a model in place, and the rest of a patched model's
lifecycle (unpatch, merge, unmerge, disabled, set_adapter, delete_adapter).

Method-agnostic: every method plugs in through the registry
(pypeft/registry.py) and names itself; this module resolves the config,
asks the method for a plan (which changes nothing), then attaches it,
freezes the base, adds the trainable copies of modules_to_save, records the
adapter on the model (`model.pypeft`, pypeft/state.py) and activates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Iterator

from torch import nn

import pypeft.methods  # noqa: F401  (registers the built-in methods)
from pypeft.layer import PypeftLayer, pypeft_layers
from pypeft.models.linear import is_quantized
from pypeft.modules_to_save import TrainableCopies
from pypeft.registry import Method, Plan, method_named, method_of, methods
from pypeft.state import (STATE_ATTR, AdapterRecord, PatchState, ensure_state, merged_out, require_state, state_of,
                          sync_merge)


# --- patching -------------------------------------------------------------------

def _config_class_names() -> list[str]:
    return sorted(m.config_class.__name__ for m in methods().values())


def make_config(config=None, method: str | None = None, options: dict | None = None,
                adapter_name: str | None = None):
    """The config patch() gets from its arguments (a config object, or a
    method name and options)."""
    options = dict(options or {})
    if isinstance(config, str):
        config, method = None, config
    if config is not None:
        if method is not None or options:
            raise ValueError("pypeft.patch: give either a config object or method= with options, not both")
        m = method_of(config)
        if m is None:
            raise TypeError(f"pypeft.patch: argument 'config': expected one of {_config_class_names()}, "
                            f"got {type(config).__name__}")
        _check_adapter_name(m, adapter_name)
        return config if adapter_name is None else dataclasses.replace(config, adapter_name=adapter_name)
    if method is None:
        raise ValueError(f"pypeft.patch: argument 'method': expected one of {sorted(methods())} (or a config "
                         "object), got None")
    m = method_named(method)
    known = {f.name for f in dataclasses.fields(m.config_class) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"pypeft.patch(method={method!r}): unknown option {unknown[0]!r}; "
                         f"options: {', '.join(sorted(known))}")
    _check_adapter_name(m, adapter_name)
    if adapter_name is not None:
        options["adapter_name"] = adapter_name
    return m.config_class(**options)


def _check_adapter_name(m: Method, adapter_name) -> None:
    if adapter_name is not None and not m.holds_adapters:
        raise ValueError(f"pypeft.patch(method={m.name!r}): argument 'adapter_name': {m.name} holds no adapter "
                         f"(it changes how the model trains), got {adapter_name!r}")


def _check_composes(state: PatchState | None, new: Method) -> None:
    if state is None:
        return
    for name in sorted(state.methods()):
        old = method_named(name)
        if not (new.composes_with(name) and old.composes_with(new.name)):
            note = new.composition_note or old.composition_note
            raise ValueError(f"pypeft.patch(method={new.name!r}): the model is patched with {name} already, and "
                             f"{new.name} does not compose with {name}{f' ({note})' if note else ''}; "
                             "pypeft.unpatch(model) first")


def plan(model: nn.Module, config) -> Plan:
    """Check `config` against the model and resolve what patching it does,
    without changing anything (patch() = plan() + attach())."""
    m = method_of(config)
    state = state_of(model)
    _check_composes(state, m)
    name = getattr(config, "adapter_name", None) if m.holds_adapters else None
    if state is not None and m.holds_adapters:
        if name in state.adapters:
            raise ValueError(f"pypeft.patch: argument 'adapter_name': adapter {name!r} exists already "
                             f"(adapters: {sorted(state.adapters)}); choose another name or delete_adapter first")
        if state.merged:
            raise ValueError("pypeft.patch: the model has merged adapters; call pypeft.unmerge(model) first")
    return m.plan(model, state, config)


def patch(model: nn.Module, config=None, *, method: str | None = None, adapter_name: str | None = None,
          **options) -> nn.Module:
    """Patch `model` in place with a PEFT method and return it.

        pypeft.patch(model, method=<name>, **options)   # a registered method's options
        pypeft.patch(model, <its config object>)

    Methods holding adapters freeze every base parameter; the new adapter (and
    the modules it trains in full, by default a sequence classifier's head)
    is trainable and active. Patching again with another adapter_name adds an
    adapter; a name in use raises. Methods that hold no adapter change how
    the model trains and compose with those that do, as each method says.
    New layers take the training flag of the modules they replace (a model in
    eval() stays in eval()). pypeft.registry.methods() lists the methods; the
    README describes each.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pypeft.patch: argument 'model': expected a torch.nn.Module, got {type(model).__name__}")
    config = make_config(config, method, options, adapter_name)
    # Resolve everything before changing anything: a bad argument loses nothing.
    return attach(model, plan(model, config))


def attach(model: nn.Module, plan: Plan) -> nn.Module:
    """Carry out a plan made by plan() (load_adapter checks its files against
    the plan in between)."""
    m = plan.method
    state = ensure_state(model)
    with state.lock:
        if m.holds_adapters and not state.adapters:  # the first adapter: the base stops training
            for p in model.parameters():
                p.requires_grad_(False)
        m.attach(model, state, plan)
        if m.holds_adapters:
            name = plan.adapter_name
            for target in plan.modules_to_save:
                state.wrap(model, target, TrainableCopies).add_adapter(name)
            state.adapters[name] = AdapterRecord(config=plan.config, layers=list(plan.targets),
                                                 modules_to_save=list(plan.modules_to_save))
            _activate(model, state, name)
        for other in state.methods() - {m.name}:
            method_named(other).model_changed(model, state)
    return model


def _activate(model: nn.Module, state: PatchState, name: str | None) -> None:
    """Make `name` the adapter that runs and trains; the others are frozen."""
    for layer in pypeft_layers(model):
        layer.activate(name)
    state.active = name


# --- the rest of the lifecycle ---------------------------------------------------

def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): the original modules, weights and requires_grad flags."""
    state = require_state(model, "unpatch")
    with state.lock:
        state.merged = False
        for layer in pypeft_layers(model):
            layer.unmerge()
        for name in reversed(list(state.method_states)):
            method_named(name).detach(model, state)
        # Newest first: a layer put inside another method's layer (BitFit's, in
        # a LoRA layer's base_layer slot) goes before the outer one is undone.
        for name, original in reversed(state.replaced.items()):
            model.set_submodule(name, original)
        for name, p in model.named_parameters():
            if name in state.requires_grad:
                p.requires_grad_(state.requires_grad[name])
        del model.__dict__[STATE_ATTR]
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (forward then runs the
    plain layers). unmerge() restores the weights exactly."""
    state = require_state(model, "merge")
    with state.lock:
        active = state.adapters.get(state.active)
        if active is not None:
            m = method_of(active.config)
            if not m.can_merge:
                raise ValueError(f"pypeft.merge: the active adapter {state.active!r} is {m.name}'s, which cannot be "
                                 "folded into the base weights")
        state.merged = True
        sync_merge(model, state)
    _report_merge_rounding(model)
    return model


def _report_merge_rounding(model: nn.Module) -> None:
    """Layers over a quantised base requantise on merge: say how much that rounded."""
    errors = [layer.merge_error for layer in pypeft_layers(model) if getattr(layer, "merge_error", None)]
    if errors:
        worst = max(errors, key=lambda e: e["relative_to_update"])
        warnings.warn(f"pypeft.merge: {len(errors)} layer(s) over a quantised base were requantised with the update "
                      f"folded in; the rounding changed their weights by up to {max(e['max_abs'] for e in errors):.3g} "
                      f"(at worst {worst['relative_to_update']:.1%} of the update's norm, "
                      f"{worst['relative_to_weight']:.2%} of the weights'; per layer: layer.merge_error). "
                      "pypeft.unmerge(model) restores the original codes exactly", stacklevel=2)


def unmerge(model: nn.Module) -> nn.Module:
    state = require_state(model, "unmerge")
    with state.lock:
        state.merged = False
        sync_merge(model, state)
    return model


def _require_adapter(state: PatchState, name: str, what: str) -> None:
    if name not in state.adapters:
        raise ValueError(f"pypeft.{what}: argument 'name': expected one of {sorted(state.adapters)}, got {name!r}")


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block, no adapter (and no trained copy of
    a module) takes part, in this thread. Merged adapters are taken out for
    the block and put back after it. Blocks nest; each restores what it found."""
    state = require_state(model, "disabled")
    context = state.context
    with merged_out(model, state):
        before = context.disabled
        context.disabled = True
        try:
            yield model
        finally:
            context.disabled = before


def set_adapter(model: nn.Module, name: str) -> None:
    state = require_state(model, "set_adapter")
    _require_adapter(state, name, "set_adapter")
    with state.lock:
        _activate(model, state, name)
        if state.merged:
            sync_merge(model, state)


def delete_adapter(model: nn.Module, name: str) -> None:
    state = require_state(model, "delete_adapter")
    _require_adapter(state, name, "delete_adapter")
    if len(state.adapters) == 1:
        raise ValueError(f"pypeft.delete_adapter: {name!r} is the only adapter; call pypeft.unpatch(model) "
                         "to remove it and restore the model")
    for other in sorted(state.methods()):
        method_named(other).check_delete(model, state, name)
    with state.lock:
        for layer in pypeft_layers(model):
            layer.unmerge()
        for layer in pypeft_layers(model):
            if layer.has_adapter(name):
                layer.delete_adapter(name)
        record = state.adapters.pop(name)
        method_of(record.config).adapter_deleted(model, state, name)
        if state.active == name:
            _activate(model, state, next(iter(state.adapters)))
        sync_merge(model, state)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's print_trainable_parameters:
    a quantised layer's weight counts as the [out, in] weights it stands for
    (peft counts bitsandbytes' packed 4-bit weights twice, as many as they hold)."""
    params = list(model.parameters())
    packed = sum(m.in_features * m.out_features - m.weight.numel() for m in model.modules()
                 if is_quantized(m) and not isinstance(m, PypeftLayer))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + packed
