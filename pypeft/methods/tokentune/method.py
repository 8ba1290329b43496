"""TokenTune's place in pypeft: it holds no adapter; patching swaps the
model's per-token modules for token-subset ones (pypeft/methods/tokentune/
modules.py), routes attention through transformers' AttentionInterface
(attention.py), and hooks the model's forward to draw each step's tokens
(selection.py). Its per-model state is the TokenTuneRecord, which detach()
undoes exactly. It composes with the adapter methods that run inside the
backbone: their layers (AdaptedLinear, and any pypeft layer whose class sets
`runs_token_subsets`, e.g. bottleneck sites) are tagged with the selection,
also when they are patched after TokenTune (model_changed). Layers
`outside_sequence` (prefix tuning's encoders, the prompt encoders) are left
alone. Prompt tuning / P-tuning rewrite the call before the selection is
drawn and tell it their virtual slots, which it always selects (see
selection.py); nothing here depends on the patch order. Prefix tuning
wraps TokenTune's attention implementation in either order (its
model_changed), and when it leaves first it tells TokenTune what to restore
instead of its name (attn_implementation_replaced)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pypeft.layer import TOKENS_ATTR, PypeftLayer, underlying
from pypeft.methods.adapted_linear import AdaptedLinear
from pypeft.methods.config_checks import check_runs_natively
from pypeft.methods.tokentune import attention
from pypeft.methods.tokentune import modules as tsm
from pypeft.methods.tokentune.checkpointing import CheckpointReplay
from pypeft.methods.tokentune.config import TokenTuneConfig
from pypeft.methods.tokentune.selection import TokenSelection
from pypeft.registry import Method, Plan
from pypeft.state import PatchState

WHERE = "pypeft.patch(method='tokentune')"


@dataclass
class TokenTuneRecord:
    """What attach() changed, so that detach() undoes exactly that."""

    config: TokenTuneConfig
    selection: TokenSelection
    swapped: list[nn.Module]
    tagged: list[nn.Module]  # attention modules and adapter layers that read the selection
    hooks: list
    attn_implementation: str | None
    replay: CheckpointReplay  # the layers' checkpointing functions it wrapped


def _plan_swaps(model: nn.Module) -> tuple[list[tuple[nn.Module, type]], list[nn.Module]]:
    """(module, mixin) pairs to swap and the modules to tag; raises, before
    anything changes, on a module with parameters TokenTune cannot run token
    by token (its weight gradient would include unselected tokens)."""
    adapter_layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    inside = tuple(name + "." for name in adapter_layers)
    # Layers of other methods that run their own token-subset forms: tagged, their insides left alone.
    own = {name: m for name, m in model.named_modules() if _runs_token_subsets(m)}
    own_inside = tuple(name + "." for name in own)
    # A layer standing for its base (BitFit's) runs as that module: it is
    # swapped itself (reading as its base), and what it holds is not visited.
    inside_stand_ins = tuple(name + "." for name, m in model.named_modules()
                             if isinstance(m, PypeftLayer) and m.stands_for_base)
    # Layers computing nothing per token (prefix tuning's encoders): neither swapped nor tagged.
    outside = tuple(name for name, m in model.named_modules() if isinstance(m, PypeftLayer) and m.outside_sequence)
    outside_inside = tuple(name + "." for name in outside)
    embedding = model.get_input_embeddings()
    swaps, tagged, unknown = [], list(own.values()), []
    for name, module in model.named_modules():
        if name in adapter_layers or name in own or name.startswith(own_inside):
            continue
        if name in outside or name.startswith(outside_inside):
            continue
        if name.startswith(inside_stand_ins) and not name.startswith(inside):
            continue
        if name.startswith(inside):
            if name.endswith(".base_layer"):
                swaps.append((module, tsm.TokenSubsetLinear))
            continue
        if module is embedding:
            swaps.append((module, tsm.TokenSubsetEmbedding))
            continue
        mixin = tsm.mixin_for(module)
        if mixin is not None:
            swaps.append((module, mixin))
        elif type(module).__name__.endswith("Attention"):
            tagged.append(module)
        elif isinstance(module, PypeftLayer) and module.stands_for_base:
            unknown.append(f"{name} ({type(underlying(module)).__name__} in a {type(module).__name__})")
        elif not isinstance(module, nn.Embedding) and any(True for _ in module.parameters(recurse=False)):
            unknown.append(f"{name} ({type(module).__name__})")
    if unknown:
        raise ValueError(f"{WHERE}: these modules hold parameters but TokenTune does not know how to run them token "
                         f"by token: {', '.join(unknown)}")
    return swaps, tagged + list(adapter_layers.values())


def _runs_token_subsets(module: nn.Module) -> bool:
    """A pypeft layer that reads the token selection itself (class attribute
    `runs_token_subsets`), e.g. a bottleneck adapter site."""
    return getattr(type(module), "runs_token_subsets", False) and not isinstance(module, AdaptedLinear)


class TokenTuneMethod(Method):
    name = "tokentune"
    config_class = TokenTuneConfig
    holds_adapters = False

    def composes_with(self, other: str) -> bool:
        return other != "read"  # READ keeps autograd out of the backbone TokenTune trains in

    def plan(self, model: nn.Module, state: PatchState | None, config: TokenTuneConfig) -> Plan:
        if state is not None and self.name in state.method_states:
            raise ValueError(f"{WHERE}: the model is patched with TokenTune already; pypeft.unpatch(model) first "
                             "to change its options")
        can_set = getattr(model, "_can_set_attn_implementation", None)
        if getattr(model, "config", None) is None or can_set is None or not can_set():
            raise ValueError(f"{WHERE}: argument 'model': expected a transformers model that computes attention "
                             f"through transformers' AttentionInterface, got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False):
            # Said before the per-module check, which would only list T5's layer norms: the
            # selection is drawn per row of one token sequence, and an encoder-decoder runs two.
            raise ValueError(f"{WHERE}: argument 'model': {type(model).__name__} is an encoder-decoder model; "
                             "TokenTune supports encoder-only and decoder-only models (its token selection is "
                             "drawn over one sequence per row, and an encoder-decoder runs two)")
        if model.get_input_embeddings() is None:
            raise ValueError(f"{WHERE}: argument 'model': {type(model).__name__} has no input embedding")
        check_runs_natively(WHERE, model.parameters())
        return Plan(self, config, extra=_plan_swaps(model))

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        swaps, tagged = plan.extra
        selection = TokenSelection(plan.config, model)
        previous = model.config._attn_implementation
        model.set_attn_implementation(attention.register())
        for module, mixin in swaps:
            tsm.swap(module, mixin, selection)
        for module in tagged:
            setattr(module, TOKENS_ATTR, selection)
        replay = CheckpointReplay(model, selection)
        hooks = [model.register_forward_pre_hook(replay.before_forward),
                 model.register_forward_pre_hook(selection.before_forward, with_kwargs=True),
                 model.register_forward_hook(selection.after_forward, always_call=True)]
        state.method_states[self.name] = TokenTuneRecord(plan.config, selection, [m for m, _ in swaps], tagged,
                                                         hooks, previous, replay)

    def model_changed(self, model: nn.Module, state: PatchState) -> None:
        """Give adapter layers added after TokenTune (and their base layers) the selection."""
        record: TokenTuneRecord = state.method_states[self.name]
        for module in model.modules():
            if _runs_token_subsets(module) and getattr(module, TOKENS_ATTR, None) is None:
                setattr(module, TOKENS_ATTR, record.selection)
                record.tagged.append(module)
            if isinstance(module, AdaptedLinear) and getattr(module, TOKENS_ATTR, None) is None:
                setattr(module, TOKENS_ATTR, record.selection)
                record.tagged.append(module)
                base = module.base_layer
                if not tsm.is_swapped(base):
                    tsm.swap(base, tsm.TokenSubsetLinear, record.selection)
                    record.swapped.append(base)

    def attn_implementation_replaced(self, model: nn.Module, state: PatchState, old: str, new: str) -> None:
        record: TokenTuneRecord | None = state.method_states.get(self.name)
        if record is not None and record.attn_implementation == old:
            record.attn_implementation = new

    def detach(self, model: nn.Module, state: PatchState) -> None:
        record: TokenTuneRecord = state.method_states.pop(self.name)
        for hook in record.hooks:
            hook.remove()
        record.replay.remove()
        for module in record.swapped:
            if tsm.is_swapped(module):
                tsm.unswap(module)
        for module in record.tagged:
            module.__dict__.pop(TOKENS_ATTR, None)
        model.set_attn_implementation(record.attn_implementation)
