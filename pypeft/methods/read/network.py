"""READ (Wang, Nguyen et al., "READ: Recurrent Adaptation of Large
Transformers", arXiv 2305.15348): a small RNN beside a frozen backbone.

The backbone runs under no_grad: nothing of it is kept for backward. Hooks on
its layers take each layer's output hidden state, normalise it (a layer norm
without parameters, so nothing grows with depth) and the RNN walks over them,
layer by layer, every token position its own sequence (one
pypeft::recurrent_scan call). Its states, averaged over the layers
(aggregate="mean") or the last one ("last"), go through the joiner, a linear
map back to the model width that starts at zero, and the result is added to
the stack's final hidden state (after its final norm), before the head. So the
patched model starts equal to the base, and backward runs only through the
head, the joiner and the RNN.

Where the correction goes: the stack that feeds the head
(pypeft/models/layer_stacks.py): BERT/RoBERTa's encoder (before BERT's
pooler, which the gradient crosses on its way to the classifier), GPT-2's and
Llama's decoder after their final norm, and T5's *decoder* (after its final
norm and dropout), with its RNN over the decoder's layers; T5's encoder also
runs under no_grad and gets no correction, so no backward crosses either
frozen stack.

The frozen stacks' dropout (training mode) draws its masks with pypeft's
counter hash instead of torch's Bernoulli RNG, which is most of a CPU
forward's time in train mode (dropout.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pypeft.layer import PerThread, PypeftLayer
from pypeft import counter_hash
from pypeft.methods.read.config import RNN_TYPES, ReadConfig
from pypeft.models.layer_stacks import LayerStack, final_stack
from pypeft.ops.recurrent_scan import recurrent_scan

ATTR = "pypeft_read"  # the child module of a stack that holds its READ networks


class ReadNetwork(nn.Module):
    """The trainable side network: an RNN cell run over the layers, and the
    joiner. Weights are named as torch.nn.GRUCell's (weight_ih, weight_hh,
    bias_ih, bias_hh) and initialised as it does."""

    def __init__(self, config: ReadConfig, width: int, layers: list[int], dtype, device):
        super().__init__()
        self.cell, self.aggregate, self.layers = config.rnn, config.aggregate, list(layers)
        gates, hidden = RNN_TYPES[config.rnn], config.hidden
        kw = {"dtype": dtype, "device": device}
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden, width, **kw))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden, hidden, **kw))
        self.bias_ih = nn.Parameter(torch.empty(gates * hidden, **kw))
        self.bias_hh = nn.Parameter(torch.empty(gates * hidden, **kw))
        bound = 1.0 / math.sqrt(hidden)
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            nn.init.uniform_(p, -bound, bound)
        self.joiner = nn.Linear(hidden, width, **kw)
        nn.init.zeros_(self.joiner.weight)  # the patched model starts equal to the base
        nn.init.zeros_(self.joiner.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states [L, B, T, width] (normalised layer outputs) -> correction [B, T, width]."""
        steps, batch, tokens, width = states.shape
        rows = states.view(steps, batch * tokens, width)
        h0 = rows.new_zeros(batch * tokens, self.weight_hh.shape[1])
        hs = recurrent_scan(rows, h0, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                cell=self.cell, c0=h0 if self.cell == "lstm" else None)
        summary = hs.mean(0) if self.aggregate == "mean" else hs[-1]
        return self.joiner(summary).view(batch, tokens, width)


def _hidden_of(output) -> torch.Tensor:
    """The hidden state in a layer's or stack's output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class _Collected(PerThread):
    """The layer outputs one forward collects, per thread: two threads
    running the model at once each fill their own."""

    def __init__(self):
        self.network: ReadNetwork | None = None
        self.states: list[torch.Tensor | None] | None = None


class ReadAdapters(PypeftLayer):
    """The READ networks of one stack, one per adapter name (one is active),
    and what the stack's forward needs to run them: it sits in the model as
    a child of the stack (`<stack>.pypeft_read`), so that the model's
    parameters(), to() and state_dict() include the networks."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.networks = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._collected = _Collected()

    # --- the lifecycle pypeft.patch expects of its layers -----------------------------------
    def add_adapter(self, name: str, config: ReadConfig, layers: list[int], dtype, device) -> None:
        network = ReadNetwork(config, self.width, layers, dtype, device)
        network.train(self.training)
        self.networks[name] = network

    def adapter_names(self) -> list[str]:
        return list(self.networks)

    def activate(self, name: str | None) -> None:
        self.active_adapter = name
        for adapter, network in self.networks.items():
            network.requires_grad_(adapter == name)

    def delete_adapter(self, name: str) -> None:
        del self.networks[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # --- the correction ---------------------------------------------------------------------
    def network(self) -> ReadNetwork | None:
        name = self.active_adapter
        return None if self.is_disabled() or name is None or name not in self.networks else self.networks[name]

    def collect(self, layer_index: int, _module, _args, output) -> None:
        """A forward hook on layer `layer_index` (bound with functools.partial)."""
        collected = self._collected
        if collected.states is None:
            return
        network = collected.network
        if layer_index in network.layers:
            dtype = network.weight_ih.dtype
            hidden = _hidden_of(output).to(dtype)
            collected.states[network.layers.index(layer_index)] = F.layer_norm(hidden, (self.width,))

    def run(self, stack_forward, args, kwargs):
        """The stack's forward: the backbone under no_grad, then the correction."""
        if self.mixed_rows() is not None:
            raise ValueError("pypeft.mixed_batch: READ adapters cannot run per row in one batch")
        network = self.network()
        if network is None:
            with torch.no_grad():
                return stack_forward(*args, **kwargs)
        collected = self._collected
        outer = (collected.network, collected.states)  # a forward inside a forward (re-entrant)
        collected.network, collected.states = network, [None] * len(network.layers)
        try:
            with torch.no_grad():
                output = stack_forward(*args, **kwargs)
            states = collected.states
        finally:
            collected.network, collected.states = outer
        if any(s is None for s in states):
            raise RuntimeError("pypeft READ: a layer the RNN reads did not run in this forward")
        correction = network(torch.stack(states))
        return _with_correction(output, correction)


def _with_correction(output, correction: torch.Tensor):
    hidden = _hidden_of(output)
    corrected = hidden + correction.to(hidden.dtype)
    if isinstance(output, torch.Tensor):
        return corrected
    if isinstance(output, tuple):
        return (corrected, *output[1:])
    output.last_hidden_state = corrected  # a ModelOutput: sets the field and its dict entry
    return output


# --- attaching to a model ----------------------------------------------------------------

@dataclass
class ReadRecord:
    """What attach() changed, so that detach() undoes exactly that."""

    stack: LayerStack
    adapters: ReadAdapters
    no_grad_stacks: list[LayerStack]
    hooks: list
    dropouts: list[nn.Module]  # the stacks' dropouts given the counter-hash mask (dropout.py)
    attn_implementation: str | None  # the model's before READ wrapped it (dropout.py), else None


def width_of(model: nn.Module, stack: LayerStack) -> int:
    for config in (getattr(stack.module, "config", None), getattr(model, "config", None)):
        for key in ("hidden_size", "d_model", "n_embd", "dim"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
    raise ValueError(f"pypeft.patch(method='read'): argument 'model': its config names no hidden size "
                     f"(hidden_size, d_model, n_embd or dim) of {type(stack.module).__name__}'s states")


class NoGradForward:
    """A stack's forward while READ is attached: the original under no_grad,
    then (on the final stack) the correction. An object rather than a closure,
    so that copy.deepcopy and pickling of the model carry it over to the copy
    (the bound original and the adapters are copied with the model)."""

    def __init__(self, original, adapters: ReadAdapters | None):
        self.original, self.adapters = original, adapters

    def __call__(self, *args, **kwargs):
        if self.adapters is None:
            with torch.no_grad():
                return self.original(*args, **kwargs)
        return self.adapters.run(self.original, args, kwargs)


def _run_under_no_grad(stack: nn.Module, adapters: ReadAdapters | None) -> None:
    stack.forward = NoGradForward(stack.forward, adapters)  # an instance attribute: __call__ finds it first


def final_stack_of(model: nn.Module) -> LayerStack:
    """The stack READ corrects (checked: its width is known)."""
    stack = _stacks(model)[0]
    width_of(model, stack)
    return stack


def _stacks(model: nn.Module) -> tuple[LayerStack, list[LayerStack]]:
    try:
        return final_stack(model)
    except ValueError as e:
        raise ValueError(f"pypeft.patch(method='read'): argument 'model': {e}") from None


def attach(model: nn.Module, stack: LayerStack) -> ReadRecord:
    """Hooks and the no_grad forward on the model's stacks (no network yet)."""
    others = _stacks(model)[1]
    adapters = ReadAdapters(width_of(model, stack))
    first = next(stack.module.parameters())
    adapters.to(first.device)
    adapters.train(stack.module.training)
    hooks = [layer.register_forward_hook(functools.partial(adapters.collect, i))
             for i, layer in enumerate(stack.layers)]
    stack.module.add_module(ATTR, adapters)
    _run_under_no_grad(stack.module, adapters)
    for other in others:
        _run_under_no_grad(other.module, None)
    # The frozen stacks draw their dropout masks with the counter hash (dropout.py).
    dropouts = counter_hash.swap_dropouts([s.module for s in (stack, *others)])
    attn_implementation = counter_hash.use_counter_hash_attention(model)
    return ReadRecord(stack, adapters, others, hooks, dropouts, attn_implementation)


def detach(model: nn.Module, record: ReadRecord) -> None:
    for hook in record.hooks:
        hook.remove()
    for s in (record.stack, *record.no_grad_stacks):
        s.module.__dict__.pop("forward", None)
    delattr(record.stack.module, ATTR)
    counter_hash.unswap_dropouts(record.dropouts)
    counter_hash.restore_attention(model, record.attn_implementation)


def network_dtype(model: nn.Module) -> torch.dtype:
    """The side network trains in float32 beside a half-precision backbone."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
