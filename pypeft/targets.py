"""Which modules of a model a method adapts, and which it trains in full
beside its adapter, by PEFT's rules, so that a config means the same in
pypeft and in `peft`:

- target_modules: a list of names, each matching a module whose name is it or
  ends with "." + it; a string is a regular expression the whole name must
  match; "all-linear" is every linear layer but the output head.
  exclude_modules (same forms) removes modules from that.
- modules_to_save: each key selects every module whose name ends with it, as
  plain text (peft's `key.endswith(target_key)`): "classifier" also selects
  DistilBERT's "pre_classifier". A sequence classifier's default is
  ["classifier", "score"] (peft's), kept for the heads this model has.
  Targets inside a module trained in full are not adapted.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from pypeft.layer import PypeftLayer
from pypeft.models import default_lora_targets, is_linear_like, linear_dims, output_head_names, task_type

SEQ_CLS_HEADS = ["classifier", "score"]  # peft's classifier_module_names


def owned_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, PypeftLayer)]


def user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for the model's own modules, not the insides of pypeft
    layers (a wrapped module keeps its name: the pypeft layer stands for it)."""
    owned = owned_prefixes(model)
    for name, module in model.named_modules():
        if name and not any(name.startswith(p) for p in owned):
            yield name, module


def name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def base_module(module: nn.Module) -> nn.Module:
    """The original module a pypeft layer wraps (the module itself otherwise)."""
    return getattr(module, "base_layer", None) if isinstance(module, PypeftLayer) and \
        hasattr(module, "base_layer") else module


def linear_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers (nn.Linear, Conv1D, or a pypeft layer wrapping one) by name."""
    return {n: m for n, m in user_modules(model) if is_linear_like(base_module(m))}


def base_dims(model: nn.Module, name: str) -> tuple[int, int]:
    """(in, out) of the linear layer at `name`, wrapped or not."""
    return linear_dims(base_module(model.get_submodule(name)))


def _describe_linear_layers(model: nn.Module) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_targets(model)})
    return ", ".join(suffixes) if suffixes else "(none)"


def selected_names(names, spec, owner: str, argument: str) -> set[str]:
    """The names a target_modules / exclude_modules value selects (peft's rules)."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{owner}: argument '{argument}': {spec!r} is not a valid regular expression "
                             f"({e})") from None
        return {n for n in names if pattern.fullmatch(n)}
    return {n for n in names if any(name_matches(n, k) for k in spec)}


def find_targets(model: nn.Module, target_modules, method: str, trained_in_full: list[str] = (),
                 exclude_modules=None) -> list[str]:
    """Names of the linear layers `target_modules` selects (PEFT's rules)."""
    owner = f"pypeft.patch(method={method!r})"
    if target_modules is None:
        target_modules = default_lora_targets(model)
        if target_modules is None:
            raise ValueError(
                f"{owner}: argument 'target_modules': no default for model type "
                f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}; pass a list of layer names, "
                f"a regex or 'all-linear'. Its linear layers are named: {_describe_linear_layers(model)}")
    inside_full = tuple(n + "." for n in trained_in_full)
    modules = {n: m for n, m in user_modules(model) if n not in trained_in_full and not n.startswith(inside_full)}
    eligible = {n for n, m in modules.items() if is_linear_like(base_module(m))}
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        chosen = eligible - output_head_names(model)
    else:
        if not isinstance(target_modules, str):
            for key in target_modules:
                wrong = [n for n, m in modules.items() if name_matches(n, key) and n not in eligible]
                if wrong and not any(name_matches(n, key) for n in eligible):
                    raise ValueError(f"{owner}: argument 'target_modules': {key!r} names {wrong[0]!r}, a "
                                     f"{type(modules[wrong[0]]).__name__}; {method} adapts linear layers only")
        chosen = selected_names(eligible, target_modules, owner, "target_modules")
    if exclude_modules is not None:
        chosen -= selected_names(chosen, exclude_modules, owner, "exclude_modules")
    if not chosen:
        raise ValueError(
            f"{owner}: argument 'target_modules': {target_modules!r} matched no linear layer of "
            f"{type(model).__name__}{' (after exclude_modules)' if exclude_modules else ''}; its linear layers "
            f"are named: {_describe_linear_layers(model)}")
    return sorted(chosen)


def default_modules_to_save(model: nn.Module) -> list[str]:
    """peft's default keys: a sequence classifier's heads."""
    return list(SEQ_CLS_HEADS) if task_type(model) == "SEQ_CLS" else []


def modules_to_save_keys(model: nn.Module, keys) -> list[str] | None:
    """What an adapter_config.json lists: the keys (None: the defaults), not
    the names they resolved to, since a loader resolves them as pypeft does."""
    keys = default_modules_to_save(model) if keys is None else list(keys)
    return keys or None


def find_modules_to_save(model: nn.Module, keys, owner: str = "pypeft.patch") -> list[str]:
    """Names of the modules trained in full: each key selects every module
    whose name ends with it (peft's plain suffix rule); None: the default
    heads. A key that selects nothing raises, except the heads' names, which
    peft lists for every classifier (a model has "classifier" or "score")."""
    if keys is None:
        keys = default_modules_to_save(model)
    names = [n for n, _ in user_modules(model)]
    chosen: list[str] = []
    for key in keys:
        hits = [n for n in names if n.endswith(key)]
        if not hits and key not in SEQ_CLS_HEADS:
            near = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"{owner}: argument 'modules_to_save': {key!r} matches the end of no module name of "
                             f"{type(model).__name__} (its modules end in: {', '.join(near[:40])})")
        chosen += [h for h in hits if h not in chosen]
    # A module inside another one trained in full is trained with it.
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]
