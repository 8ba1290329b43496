"""Which linear layers of a model quantize() replaces, and which it leaves in
full precision, by the rules transformers' bitsandbytes integration uses
(so that a pypeft-quantised model and the same model loaded by
transformers + bitsandbytes hold the same layers in 4 bits).

- Candidates: exactly nn.Linear, and transformers' Conv1D (subclasses of
  nn.Linear, such as nn.MultiheadAttention's out_proj, are read by their
  owners' code as plain weights: left alone, as transformers does).
- In a patched model, only the base layers pypeft's layers wrap
  (`base_layer`) are candidates (and layers another method swapped the
  class of, which quantize() refuses: TokenTune's); the modules pypeft adds (adapters,
  trainable copies, side networks) train and stay in full precision. Names
  are the model's own (without the `.base_layer` steps), as in a checkpoint.
- Left out by default: the output head (transformers' get_keys_to_not_convert:
  the output embeddings, tied weights, the last module), a sequence
  classifier's head (pypeft.models.output_head_names), and the model's
  `_keep_in_fp32_modules` (T5's `wo`, whose caller reads its weight's dtype).
  `skip` replaces the default head list (as llm_int8_skip_modules does);
  keep-in-fp32 modules and weights shared with another module are always left.
- Layers with an odd in_features cannot be packed two codes per byte: left
  in full precision, with a warning naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from pypeft.layer import PypeftLayer
from pypeft.models import output_head_names
from pypeft.quant.nf4_linear import _is_conv1d


@dataclass
class Candidate:
    path: str          # where the module sits now (inside pypeft layers: '....base_layer')
    name: str          # the model's own name for it (what checkpoints and skip lists name)
    module: nn.Module


@dataclass
class Selection:
    chosen: list[Candidate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)     # left in full precision (the config's skip list)
    odd: list[str] = field(default_factory=list)         # left for an odd in_features


try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


def is_plain_linear(module: nn.Module) -> bool:
    """nn.Linear or Conv1D, also when another method swapped its class in
    place (TokenTune's token-subset subclasses record the original)."""
    cls = getattr(type(module), "_pypeft_original_class", type(module))
    return cls is nn.Linear or (Conv1D is not None and issubclass(cls, Conv1D))


def candidates(model: nn.Module) -> list[Candidate]:
    found: list[Candidate] = []

    def walk(module: nn.Module, path: str, name: str) -> None:
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            if isinstance(module, PypeftLayer):
                if child_name != "base_layer":
                    continue  # pypeft's own modules
                child_logical = name
            else:
                child_logical = f"{name}.{child_name}" if name else child_name
            if is_plain_linear(child):
                found.append(Candidate(child_path, child_logical, child))
            else:
                walk(child, child_path, child_logical)

    walk(model, "", "")
    return found


def matches(name: str, patterns) -> bool:
    """transformers' should_convert_module rule, negated: a pattern matches
    from the start up to a module boundary, as a regex with that boundary,
    or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def default_skips(model: nn.Module) -> set[str]:
    """The head modules transformers' bnb integration leaves in full precision."""
    skips = set()
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        if hasattr(model, "all_tied_weights_keys"):
            skips.update(get_keys_to_not_convert(model))
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    skips.update(output_head_names(model))
    return skips


def keep_in_fp32(model: nn.Module) -> set[str]:
    keep = set()
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        keep.update(getattr(model, attr, None) or ())
    return keep


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of weights that more than one module holds (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def select(model: nn.Module, skip) -> Selection:
    patterns = sorted(default_skips(model)) if skip is None else list(skip)
    always = sorted(keep_in_fp32(model))
    shared = _shared_weights(model)
    sel = Selection()
    for c in candidates(model):
        weight = c.module.weight
        if matches(c.name, patterns) or matches(c.name, always) or id(weight) in shared:
            sel.skipped.append(c.name)
            continue
        in_features = weight.shape[0] if _is_conv1d(c.module) else weight.shape[1]
        if in_features % 2:
            sel.odd.append(c.name)
            continue
        sel.chosen.append(c)
    return sel
