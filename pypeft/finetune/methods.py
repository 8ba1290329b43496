"""--method for both finetune tasks: a method name, 'full', or a composition
such as 'lora+tokentune' (each part patched in the order given), with the
job's default options and learning rate for each."""

from __future__ import annotations

import dataclasses

import pypeft
from pypeft.registry import method_named, methods as registered_methods
from pypeft.finetune.common import first_line
from pypeft.finetune.errors import UsageError

# Not a pypeft.patch method: every weight trains, as the baseline TokenTune is
# measured against.
FULL_FINETUNING = "full"
COMPOSE = "+"

# The job's settings for a method when the command line does not say: chosen
# for fine-tuning a small encoder classifier (the BBC News default reaches
# >= 0.90 test accuracy in under 3 minutes on 2 CPU cores). A method not
# listed gets pypeft.patch's own defaults.
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
    "tokentune": {"k": 16},  # a quarter of the default 64 tokens
    # Soft prompts: 20 virtual tokens, as in peft's examples (Lester et al. see
    # little gain past 20 on a model this size); the head trains beside them.
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20},
    "prefix_tuning": {"num_virtual_tokens": 20},
}
# Methods whose virtual tokens take positions before the text's (prompt and
# P-tuning's join the input; prefix tuning's, as peft's, put the real tokens at
# positions n..): max_length + num_virtual_tokens must fit the model's positions.
VIRTUAL_POSITION_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")

# VeRA trains two vectors per layer against fixed random matrices and wants a
# larger step than LoRA (Kopiczko et al. use 4e-3 to 1e-2 on GLUE); 5e-3
# reaches 0.94 on the default data in 2 epochs, 1e-3 stays near chance.
# Methods that train every weight (full fine-tuning, TokenTune alone) want the
# small step usual for BERT fine-tuning.
# READ trains a small RNN from scratch beside the frozen backbone: 3e-3 reaches
# 0.92 on the default data in 2 epochs, 1e-3 0.90.
# BitFit trains only the biases (and the head): 5e-3 reaches 0.948 on the default data in 2 epochs, 1e-2
# 0.951; in short runs (10-20 steps) 2e-2 or more collapsed to one class, so the default keeps a margin.
# Soft-prompt methods train a few vectors in front of a frozen network and want
# a far larger step than LoRA (Lester et al. use 0.3 with Adafactor; peft's
# examples 3e-2 for prompt tuning, 1e-2 for prefix tuning); see RESULTS.md for
# the figures on the default data.
DEFAULT_LR = 1e-3
METHOD_LR: dict[str, float] = {"vera": 5e-3, FULL_FINETUNING: 1e-4, "tokentune": 1e-4, "read": 3e-3,
                               "bitfit": 5e-3, "prompt_tuning": 3e-2, "p_tuning": 1e-2, "prefix_tuning": 1e-2}


def parts(method: str) -> list[str]:
    """The methods of `method` in patch order ('lora+tokentune' -> ['lora', 'tokentune'])."""
    names = [name.strip() for name in method.split(COMPOSE)]
    if not method or any(not name for name in names):
        raise UsageError(f"argument --method: expected a method name or names joined by '{COMPOSE}' "
                         f"(e.g. lora+tokentune), got {method!r}")
    if len(set(names)) < len(names):
        raise UsageError(f"argument --method: expected each method once, got {method!r}")
    if FULL_FINETUNING in names and len(names) > 1:
        raise UsageError(f"argument --method: {FULL_FINETUNING!r} (every weight trains) composes with nothing; "
                         f"for full fine-tuning over a subset of tokens use 'tokentune', got {method!r}")
    known = set(registered_methods()) | {FULL_FINETUNING}
    for name in names:
        if name not in known:
            raise UsageError(f"argument --method: expected one of {sorted(known)} or several joined by "
                             f"'{COMPOSE}', got {name!r}")
    return names


def _holds_adapters(name: str) -> bool:
    return name != FULL_FINETUNING and method_named(name).holds_adapters


def learning_rate(method: str, lr: float | None, table: dict[str, float] | None = None,
                  default: float = DEFAULT_LR) -> float:
    """The given lr, else the rate of the part that trains (an adapter's before TokenTune's full-weight one)."""
    if lr is not None:
        return lr
    table = METHOD_LR if table is None else table
    names = parts(method)
    trained = [n for n in names if _holds_adapters(n)] or names
    return table.get(trained[0], default)


def options_per_part(method: str, given: dict, defaults: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each part's pypeft.patch options: the job's defaults, overridden by what
    the user gave; a given option goes to every part whose config takes it,
    and one that no part takes is an error naming the options there are."""
    defaults = METHOD_DEFAULTS if defaults is None else defaults
    names = parts(method)
    if FULL_FINETUNING in names:
        if given:
            raise UsageError(f"argument --method: {FULL_FINETUNING!r} takes no method options, got {given}")
        return {FULL_FINETUNING: {}}
    fields = {n: {f.name for f in dataclasses.fields(method_named(n).config_class) if f.init}
              for n in names}
    per_part = {n: dict(defaults.get(n, {})) for n in names}
    for key, value in given.items():
        takers = [n for n in names if key in fields[n]]
        if not takers:
            known = sorted(set().union(*fields.values()) - {"adapter_name"})
            raise UsageError(f"argument --method {method}: unknown option {key!r}; options: {', '.join(known)}")
        for n in takers:
            per_part[n][key] = value
    return per_part


def apply(model, method: str, per_part: dict[str, dict]):
    """Patch `model` with each part in order (nothing for full fine-tuning)."""
    for name, options in per_part.items():
        if name == FULL_FINETUNING:
            continue
        try:
            pypeft.patch(model, method=name, **options)
        except (ValueError, TypeError) as exc:  # bad option value, no target layers, a refused composition...
            raise UsageError(first_line(exc)) from None
    return model


def describe(per_part: dict[str, dict]) -> str:
    """'lora (r=8, alpha=16) + tokentune (k=16)' for the report."""
    shown = []
    for name, options in per_part.items():
        settings = ", ".join(f"{k}={v}" for k, v in options.items())
        shown.append(name + (f" ({settings})" if settings else ""))
    return f" {COMPOSE} ".join(shown)
