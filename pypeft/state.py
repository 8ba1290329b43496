"""What patch() records on a model (`model.pypeft`, a PatchState), so that
unpatch() restores the original modules and flags exactly, saving and
loading know which adapters exist, and each method finds its per-model state.

This is the public state API methods and the io layer use: state_of(),
require_state(), PatchState.wrap() (swap a module for a pypeft layer,
recording the original), PatchState.method_states (one entry per method that
keeps per-model state: VeRA's shared matrices, TokenTune's token selection,
READ's hooks), and merged_out() (adapters taken out of the base weights for a
block). Lifecycle changes hold the state's lock: two threads patching,
merging or switching one model at once do not interleave.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch import nn

from pypeft.layer import ForwardContext, PypeftLayer, pypeft_layers

STATE_ATTR = "pypeft"


@dataclass
class AdapterRecord:
    config: Any                      # the method's config (e.g. LoraConfig)
    layers: list[str]                # names of the modules holding this adapter
    modules_to_save: list[str]       # names of the modules trained in full with it


@dataclass
class PatchState:
    replaced: dict[str, nn.Module] = field(default_factory=dict)   # name -> original module
    requires_grad: dict[str, bool] = field(default_factory=dict)   # parameter -> original flag
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: str | None = None
    merged: bool = False               # the user asked for the active adapter folded into the weights
    method_states: dict[str, Any] = field(default_factory=dict)    # method name -> its per-model state
    context: ForwardContext = field(default_factory=ForwardContext)
    merge_holds: int = 0               # blocks (disabled, mixed_batch) that need the weights unmerged
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    # A lock is neither picklable nor copyable: a copy gets its own.
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("lock")
        state["merge_holds"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def methods(self) -> set[str]:
        """Names of the methods patched into the model."""
        return {r.config.method for r in self.adapters.values()} | set(self.method_states)

    def wrap(self, model: nn.Module, name: str, make: Callable[[nn.Module], PypeftLayer]) -> PypeftLayer:
        """The pypeft layer at `name`: the module there if it already is one of
        `make`'s kind (a class), else make(original), put in its place with the
        original recorded (for unpatch) and the original's training flag."""
        module = model.get_submodule(name)
        if isinstance(make, type) and isinstance(module, make):
            return module
        layer = make(module)
        layer.train(module.training)
        layer.bind(self.context)
        self.replaced.setdefault(name, module)
        model.set_submodule(name, layer)
        return layer


def state_of(model: nn.Module) -> PatchState | None:
    return model.__dict__.get(STATE_ATTR) if isinstance(model, nn.Module) else None


def require_state(model: nn.Module, what: str) -> PatchState:
    if not isinstance(model, nn.Module):
        raise TypeError(f"pypeft.{what}: argument 'model': expected a torch.nn.Module, got {type(model).__name__}")
    state = state_of(model)
    if state is None:
        inner = getattr(model, "module", None)  # DistributedDataParallel, DataParallel: the model is inside
        hint = (f" ({type(model).__name__} wraps a patched model: pass its .module)"
                if isinstance(inner, nn.Module) and state_of(inner) is not None else " (call pypeft.patch first)")
        raise ValueError(f"pypeft.{what}: the model is not patched{hint}")
    return state


def ensure_state(model: nn.Module) -> PatchState:
    """The model's PatchState, made (recording requires_grad flags) on first use."""
    state = state_of(model)
    if state is None:
        state = PatchState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = state
    return state


def sync_merge(model: nn.Module, state: PatchState) -> None:
    """Bring the layers' weights in line with the state: the active adapter
    folded in when merged and no block needs them unmerged, else unmerged.
    Unmerging restores the pre-merge weights exactly, so any number of
    switches leaves the base weights as they were."""
    want = state.merged and state.merge_holds == 0
    for layer in pypeft_layers(model):
        layer.unmerge()
        if want:
            layer.merge()


@contextlib.contextmanager
def merged_out(model: nn.Module, state: PatchState) -> Iterator[None]:
    """Merged adapters taken out of the base weights for the block (counted,
    so nested and concurrent blocks put them back only when the last ends)."""
    with state.lock:
        state.merge_holds += 1
        if state.merge_holds == 1 and state.merged:
            sync_merge(model, state)
    try:
        yield
    finally:
        with state.lock:
            state.merge_holds -= 1
            if state.merge_holds == 0 and state.merged:
                sync_merge(model, state)
