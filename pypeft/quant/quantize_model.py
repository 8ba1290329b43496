"""pypeft.quantize(model, "nf4"): the model's frozen linear layers stored in
NF4 in place, before or after pypeft.patch.

After patch, the base layers sit inside pypeft's layers (`base_layer`) and
the PatchState remembers the modules patch() replaced, so that unpatch()
puts them back: quantising then makes that record follow (unpatch gives
back the quantised plain layers, not the full-precision ones it would have
to keep in memory), and the recorded requires_grad flag of each quantised
weight becomes False (a uint8 tensor cannot require grad).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pypeft.quant import hf_config, targets
from pypeft.quant.nf4_linear import NF4Linear, check_blocksize, check_compute_dtype
from pypeft.registry import method_named
from pypeft.state import state_of

METHODS = ("nf4",)


def quantize(model: nn.Module, method: str = "nf4", *, double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, blocksize: int = 64, skip=None) -> nn.Module:
    """Replace the model's linear layers (nn.Linear, transformers' Conv1D) by
    NF4Linear, in place, and return the model.

    double_quant: QLoRA's double quantisation of the absmax statistics (bnb's
    bnb_4bit_use_double_quant). compute_dtype: what the layers compute in
    (default: each layer's weight dtype). blocksize: weights per absmax.
    skip: module names or patterns to leave in full precision (transformers'
    llm_int8_skip_modules rules: prefix, regex or suffix); None leaves the
    output head and a classifier's head, as transformers + bitsandbytes do.
    Layers with an odd in_features stay in full precision (a warning names
    them). Records `model.config.quantization_config` (bitsandbytes' form), so
    that save_pretrained writes a checkpoint transformers + bitsandbytes load.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pypeft.quantize: argument 'model': expected a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"pypeft.quantize: argument 'method': expected one of {list(METHODS)}, got {method!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"pypeft.quantize: argument 'double_quant': expected a bool, got {double_quant!r}")
    check_compute_dtype(compute_dtype, "pypeft.quantize", allow_none=True)
    check_blocksize(blocksize, "pypeft.quantize")
    if skip is not None and (isinstance(skip, str) or not all(isinstance(s, str) for s in skip)):
        raise TypeError(f"pypeft.quantize: argument 'skip': expected a list of module names or patterns, got {skip!r}")
    if hf_config.is_nf4(hf_config.quantization_config(model)) or any(isinstance(m, NF4Linear) for m in model.modules()):
        raise ValueError("pypeft.quantize: argument 'model': the model is quantised already (it holds NF4Linear "
                         "layers / its config has an NF4 quantization_config)")
    state = state_of(model)
    if state is not None and state.merged:
        raise ValueError("pypeft.quantize: the model has merged adapters (their update is in the base weights); "
                         "call pypeft.unmerge(model) first")

    selection = targets.select(model, skip)
    swapped = [c for c in selection.chosen if type(c.module) not in (nn.Linear, targets.Conv1D)]
    if swapped:
        # TokenTune runs these as token-subset layers (a class swap in place):
        # an NF4 layer in their place would run in full and break TokenTune's
        # gradients without a word.
        raise ValueError(f"pypeft.quantize: {len(swapped)} linear layer(s) run as another method's layers "
                         f"({type(swapped[0].module).__name__} at {swapped[0].name}, ...: TokenTune); "
                         "quantise before patching it (pypeft.unpatch, quantize, then patch)")
    if selection.odd:
        warnings.warn(f"pypeft.quantize: {len(selection.odd)} linear layer(s) with an odd in_features stay in full "
                      f"precision (NF4 packs two weights per byte): {', '.join(selection.odd)}", stacklevel=2)
    if not selection.chosen:
        warnings.warn("pypeft.quantize: no linear layer to quantise (all skipped)", stacklevel=2)

    for c in selection.chosen:
        layer = NF4Linear.from_linear(c.module, blocksize=blocksize, double_quant=double_quant,
                                      compute_dtype=compute_dtype)
        model.set_submodule(c.path, layer)
        if state is not None:
            _follow(state, c, layer)
        # Nothing holds the full-precision layer now: it is freed layer by
        # layer, so the model never holds both copies in full.
        c.module = None
    if state is not None:
        for name in sorted(state.methods()):  # as after a patch(): methods that tag layers see the new ones
            method_named(name).model_changed(model, state)

    left = selection.skipped + selection.odd
    names = [c.name for c in selection.chosen]
    dtype = compute_dtype or _main_dtype(model)
    hf_config.record(model, hf_config.bnb_config(double_quant, dtype,
                                                 hf_config.skip_patterns(left, names, targets.matches)))
    return model


def _follow(state, c: targets.Candidate, layer: NF4Linear) -> None:
    """Make unpatch() restore the quantised layer and its flags (state.py)."""
    for name, original in list(state.replaced.items()):
        if original is c.module:
            state.replaced[name] = layer
            state.requires_grad[f"{name}.weight"] = False
    if f"{c.name}.weight" in state.requires_grad:
        state.requires_grad[f"{c.name}.weight"] = False


def _main_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
