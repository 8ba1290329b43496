"""The method protocol and the registry every method plugs into.

A method is one package under pypeft/methods/ (or anywhere: a test or a user
package) that subclasses Method and calls register_method(MyMethod()) once.
patch.py and io.py then work through the protocol and name no method:

    patching    plan() resolves and checks everything without changing the
                model; attach() changes it (pypeft.patch runs both; load_adapter
                runs plan(), checks the files against it, then attach()).
    lifecycle   the layers it puts in the model are PypeftLayers (activate,
                delete_adapter, merge/unmerge); Method says whether adapters
                merge (can_merge), what the method composes with
                (composes_with), and how to undo what attach() did beyond
                swapping modules (detach; adapter_deleted); methods that own
                the attention implementation in turn hear of each other
                (model_changed; attn_implementation_replaced).
    disk        recognises() / to_disk() / config_from_disk() /
                expected_tensors() / load_tensors(): the method's format.
                io.py reads and writes the two files, checks keys, shapes and
                dtypes, and writes atomically for every method alike;
                training_state() / load_training_state(): what training
                needs beyond the format, for resuming (PypeftTrainer).

Per-model state a method keeps (shared matrices, hooks) lives in
`state.method_states[method.name]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pypeft.state import PatchState


@dataclass
class Plan:
    """What patching `config` into a model will do, resolved and checked."""

    method: "Method"
    config: Any
    targets: list[str] = field(default_factory=list)          # modules the method adapts
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full beside it
    extra: Any = None                                          # the method's own resolved facts

    @property
    def adapter_name(self) -> str | None:
        return getattr(self.config, "adapter_name", None)


class Method:
    """How a PEFT method plugs into pypeft. Subclass it, set the class
    attributes, implement plan() and attach(), and register an instance."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    holds_adapters: ClassVar[bool] = True  # False: it changes how the model trains (TokenTune), no adapter name
    can_merge: ClassVar[bool] = True       # whether its adapters fold into the base weights
    composition_note: ClassVar[str] = ""   # why it refuses to compose, for the error message

    # --- patching ------------------------------------------------------------------
    def composes_with(self, other: str) -> bool:
        """Whether a model may hold this method and `other` together (asked
        both ways round)."""
        return True

    def plan(self, model: nn.Module, state: PatchState | None, config) -> Plan:
        """Resolve targets and check everything; raise on bad input; change nothing."""
        raise NotImplementedError

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        """Change the model as planned: wrap targets (state.wrap), add the
        adapter `plan.adapter_name` to the layers, keep per-model state in
        state.method_states. patch() then adds the modules_to_save copies,
        records the adapter and activates it."""
        raise NotImplementedError

    def model_changed(self, model: nn.Module, state: PatchState) -> None:
        """Another patch() changed the model (e.g. TokenTune tags new layers)."""

    def attn_implementation_replaced(self, model: nn.Module, state: PatchState, old: str, new: str) -> None:
        """Attention implementation `old`, set by a method now detached
        (prefix tuning's, when its last adapter is deleted), wrapped `new`: a
        method that recorded `old` as the implementation to restore on detach
        restores `new` instead (unpatch must give back the original)."""

    def check_delete(self, model: nn.Module, state: PatchState, name: str) -> None:
        """Raise if adapter `name` (of any method) must not be deleted because
        something of this method depends on it (a fusion of it)."""

    def adapter_deleted(self, model: nn.Module, state: PatchState, name: str) -> None:
        """Adapter `name` of this method is gone (its record already removed)."""

    def detach(self, model: nn.Module, state: PatchState) -> None:
        """unpatch(): undo what attach() did beyond swapping modules (which
        patch restores itself): hooks, class swaps, per-model state."""

    # --- disk ----------------------------------------------------------------------
    # The files an adapter directory holds: its config (JSON), and its weights: the first name is
    # written; loading reads the first one present (a ".bin" only through torch.load(weights_only=True)).
    config_name: ClassVar[str] = "adapter_config.json"
    weights_names: ClassVar[tuple[str, ...]] = ("adapter_model.safetensors",)
    # The key prefix of the modules trained in full beside an adapter (heads):
    # peft's "base_model.model." (its tuners wrap the model once more), but
    # "base_model." for its prompt-learning methods, which do not.
    head_prefix: ClassVar[str] = "base_model.model."

    def format_hint(self) -> str:
        """What recognises() looks for in a config file, for the error when nothing does."""
        return f"{self.format_name()}"

    def extra_files(self, model: nn.Module, state: PatchState, name: str,
                    heads: dict[str, torch.Tensor]) -> dict:
        """Files the format keeps beside its config and weights: name ->
        writer(path), written atomically with the two. `heads`: the tensors of
        the modules trained beside adapter `name`, by their keys in the model
        (e.g. "classifier.weight")."""
        return {}

    def heads_from_disk(self, directory, fields: dict, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Heads a format stores in files of its own (by their keys in the
        model), for a config that does not name its modules_to_save; None: none."""
        return None

    def comparable(self, fields: dict) -> dict:
        """The part of a config file that must be the same in the copy the
        weights record and the config file beside them (fields that only
        initialise may differ)."""
        return fields

    def recognises(self, fields: dict) -> bool:
        """Whether an adapter_config.json is this method's."""
        return False

    def format_name(self) -> str:
        """How error messages name this method's on-disk format."""
        return self.name

    def to_disk(self, model: nn.Module, state: PatchState, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config.json fields, tensors by key) of adapter `name`,
        without the modules_to_save copies (io adds those)."""
        raise NotImplementedError(f"pypeft: method {self.name!r} has no on-disk format")

    def config_from_disk(self, fields: dict, adapter_name: str):
        """The config an adapter_config.json describes (raise ValueError
        naming the field on what this method cannot load)."""
        raise NotImplementedError

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """key -> shape of every tensor the files must hold (heads excluded);
        may check `fields` (the adapter_config.json) and `tensors` against the
        model further (raise ValueError)."""
        raise NotImplementedError

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Copy the checked tensors into the attached adapter."""
        raise NotImplementedError

    # --- resuming training ---------------------------------------------------------
    def training_state(self, model: nn.Module, state: PatchState, name: str) -> dict[str, torch.Tensor]:
        """What adapter `name` trains that its on-disk format does not keep,
        by keys of the method's choosing (a format that stores what inference
        computes: peft's P-tuning keeps the prompts, not the encoder that
        computes them). PypeftTrainer checkpoints it beside the adapter and,
        resuming, restores it with load_training_state instead of loading the
        adapter's files. Default: nothing (the format keeps everything)."""
        return {}

    def load_training_state(self, model: nn.Module, state: PatchState, name: str,
                            tensors: dict[str, torch.Tensor]) -> None:
        """Copy training_state()'s tensors back into adapter `name`, in place
        (the parameters stay the objects an optimizer holds)."""
        raise NotImplementedError(f"pypeft: method {self.name!r} keeps no training state")


_BY_NAME: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available to pypeft.patch(method=method.name) and to
    save/load. Registering a name again replaces the earlier method."""
    if not isinstance(method, Method):
        raise TypeError(f"pypeft.register_method: argument 'method': expected a pypeft.Method instance, "
                        f"got {type(method).__name__}")
    if not method.name or not isinstance(method.name, str):
        raise ValueError("pypeft.register_method: argument 'method': its `name` must be a non-empty str")
    _BY_NAME[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _BY_NAME.pop(name, None)


def methods() -> dict[str, Method]:
    """Registered methods by name."""
    return dict(_BY_NAME)


def method_named(name: str, owner: str = "pypeft.patch") -> Method:
    if name not in _BY_NAME:
        raise ValueError(f"{owner}: argument 'method': expected one of {sorted(_BY_NAME)}, got {name!r}")
    return _BY_NAME[name]


def method_of(config) -> Method | None:
    """The registered method whose config class `config` is an instance of."""
    for method in _BY_NAME.values():
        if isinstance(config, method.config_class):
            return method
    return None
