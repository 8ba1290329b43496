"""Which modules' biases a BitFitConfig trains, by peft's target_modules rules
(pypeft/targets.py), and where in the model each BitFit layer goes.

A module qualifies by its bias: one it has (trained from a copy of it), or an
empty bias slot (nn.Linear(bias=False): its `bias` is None) where
add_missing_biases adds a zero-initialised one. Modules with no bias at all
(RMSNorm, Embedding) never do. A module another method adapts (a LoRA or VeRA
layer) qualifies by the module it wraps: the BitFit layer goes inside it, in
its base_layer's place, so the LoRA layer runs its fused op with the trained
bias (pypeft.layer.PypeftLayer.stands_for_base).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pypeft.layer import PypeftLayer
from pypeft.methods.bitfit.config import WHERE, BitFitConfig
from pypeft.methods.bitfit.layer import BitFitLayer, bias_slot, missing_bias_shape
from pypeft.models import is_linear_like, output_head_names
from pypeft.targets import selected_names, user_modules


@dataclass(frozen=True)
class BiasTarget:
    name: str                        # the module's name in the model (what the files name)
    path: str                        # where its BitFit layer sits (inside another method's layer, if any)
    shape: tuple[int, ...]           # the bias's shape
    added: bool                      # the module had no bias: the trained one starts at zero


def _wrapped_module(module: nn.Module) -> nn.Module:
    """The model's own module under any pypeft layers that wrap it."""
    while isinstance(module, PypeftLayer) and isinstance(module.__dict__["_modules"].get("base_layer"), nn.Module):
        module = module.base_layer
    return module


def bitfit_path(model: nn.Module, name: str) -> str:
    """Where the BitFit layer of module `name` sits (or goes): at `name`, or
    inside the layers of other methods that wrap that module."""
    module, path = model.get_submodule(name), name
    while isinstance(module, PypeftLayer) and not isinstance(module, BitFitLayer) and \
            isinstance(module.__dict__["_modules"].get("base_layer"), nn.Module):
        module, path = module.base_layer, path + ".base_layer"
    return path


def bitfit_layer(model: nn.Module, name: str) -> BitFitLayer:
    return model.get_submodule(bitfit_path(model, name))


def _describe(modules: dict[str, nn.Module], names) -> str:
    kinds = sorted({f"{n.rsplit('.', 1)[-1]} ({type(modules[n]).__name__})" for n in names})
    return ", ".join(kinds[:30]) if kinds else "(none)"


def find_bias_targets(model: nn.Module, config: BitFitConfig, trained_in_full: list[str]) -> list[BiasTarget]:
    inside_full = tuple(n + "." for n in trained_in_full)
    modules = {n: _wrapped_module(m) for n, m in user_modules(model)
               if n not in trained_in_full and not n.startswith(inside_full)}
    slots = {n: bias_slot(m) for n, m in modules.items()}
    with_bias = {n for n, s in slots.items() if s == "bias"}
    bias_less = {n for n, s in slots.items() if s == "missing"}
    spec = config.target_modules
    if spec is None or (isinstance(spec, str) and spec.lower() == "all-linear"):
        heads = output_head_names(model)
        pool = set(modules) if spec is None else {n for n, m in modules.items() if is_linear_like(m)} - heads
        chosen = (pool & with_bias) | ((pool & bias_less) - heads if config.add_missing_biases else set())
    else:
        keys = [spec] if isinstance(spec, str) else list(spec)  # a regex, or names
        chosen = set()
        for key in keys:
            hits = selected_names(modules, key if isinstance(spec, str) else [key], WHERE, "target_modules")
            usable = (hits & with_bias) | (hits & bias_less if config.add_missing_biases else set())
            if hits and not usable:
                first = sorted(hits)[0]
                if hits & bias_less:
                    raise ValueError(
                        f"{WHERE}: argument 'target_modules': {key!r} selects only modules without a bias (e.g. "
                        f"{first!r}, a {type(modules[first]).__name__} with bias=None); pass "
                        "add_missing_biases=True to train zero-initialised biases there")
                raise ValueError(f"{WHERE}: argument 'target_modules': {key!r} selects only modules that have no "
                                 f"bias (e.g. {first!r}, a {type(modules[first]).__name__}); BitFit trains biases")
            chosen |= usable
    if config.exclude_modules is not None:
        chosen -= selected_names(chosen, config.exclude_modules, WHERE, "exclude_modules")
    if not chosen:
        raise ValueError(
            f"{WHERE}: argument 'target_modules': {spec!r} selected no module with a bias in "
            f"{type(model).__name__}{' (after exclude_modules)' if config.exclude_modules is not None else ''}; "
            f"modules with a bias: {_describe(modules, with_bias)}"
            + (f"; without one (add_missing_biases=True adds it): {_describe(modules, bias_less)}"
               if bias_less and not config.add_missing_biases else ""))
    targets = []
    for name in sorted(chosen):
        module = modules[name]
        if name in with_bias:
            shape, added = tuple(module.bias.shape), False
        else:
            shape, added = missing_bias_shape(module), True
            if shape is None:
                raise ValueError(f"{WHERE}: argument 'add_missing_biases': cannot add a bias to {name!r}, a "
                                 f"{type(module).__name__} (BitFit adds biases to Linear, Conv and LayerNorm "
                                 "modules); leave it out with exclude_modules")
        targets.append(BiasTarget(name, bitfit_path(model, name), shape, added))
    return targets
