"""Reading a peft adapter_config.json field by field.

peft writes every field of its config class. pypeft must load what means the
same to it and refuse, by name, what would change the adapter's math. Each
PEFT-format method declares its fields in three kinds:

    used        pypeft reads them (r, lora_alpha, target_modules, ...)
    init_only   they change only how the adapter started, not what trained
                weights mean (init_lora_weights=True/"gaussian", VeRA's
                init_weights, d_initial): loaded whatever their value
    neutral     field -> predicate: the value that leaves the math plain
                (use_dora false, bias "none", no rank_pattern, ...); any
                other value is refused by name

plus peft's bookkeeping (METADATA). A field pypeft does not know (a newer
peft's) loads when its value is empty (None, False, "", [], {}), the way a
new option's default is written; otherwise it is refused by name, since
pypeft cannot tell what it does.
"""

from __future__ import annotations

from typing import Callable

METADATA = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                      "revision", "inference_mode"})

# pypeft's own formats (methods peft has none for: READ, BitFit) name their
# method in adapter_config.json under this key instead of peft_type.
METHOD_KEY = "pypeft_method"

Neutral = dict[str, tuple[Callable[[object], bool], str]]  # field -> (is neutral?, what is expected)


def is_empty(value) -> bool:
    return value is None or value is False or value in ("", [], {}, ())


def none_or_empty(value) -> bool:
    return is_empty(value)


def check_fields(fields: dict, peft_type: str, used: set[str], init_only: set[str], neutral: Neutral) -> None:
    """Raise ValueError naming the first field pypeft cannot honour."""
    for key, value in fields.items():
        if key in METADATA or key in used or key in init_only:
            continue
        if key in neutral:
            ok, expected = neutral[key]
            if not ok(value):
                raise ValueError(f"option {key}={value!r} is not supported by pypeft's {peft_type} "
                                 f"(expected {expected}); it changes what the adapter's weights mean")
        elif not is_empty(value):
            raise ValueError(f"option {key}={value!r} is unknown to pypeft's {peft_type} (a newer peft's option?); "
                             "pypeft cannot tell whether it changes the adapter's math, so it refuses to load it")
