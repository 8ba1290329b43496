"""TokenTune (Simoulin et al., "Memory-Efficient Fine-Tuning of Transformers
via Token Selection", EMNLP 2024): backpropagate through k tokens per
sequence, so that only their activations are kept for backward.

Each training forward draws, per sequence, k positions (`TokenSelection`);
the model's per-token modules run as token-subset ops
(pypeft/methods/token_subset_modules.py) and its attention as
pypeft::token_subset_attention (pypeft/models/token_subset_attention.py).
Forward values equal the unpatched model's; gradients are those of a model in
which every per-token computation of an unselected token is a constant, while
selected queries still attend to every key and value. eval() and no_grad run
the model unchanged.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from pypeft.methods import token_subset_modules as tsm

Selector = Callable[[torch.Tensor | None, torch.Tensor | None, int], torch.Tensor]


@dataclass
class TokenTuneConfig:
    """Options of pypeft.patch(model, method="tokentune", ...).

    k: tokens per sequence that carry gradients (clamped to the batch's
        sequence length T), or
    fraction: a share of T instead (k = ceil(fraction * T)); give one of them
        (neither: k = 16).
    keep: positions always selected by the random selector, counted among each
        sequence's non-padding tokens (negative from its end); "auto": the
        first token for encoders, the first and the last for decoders.
    selector: "random" (uniform without replacement among non-padding tokens,
        plus `keep`), or a callable (input_ids, attention_mask, k) ->
        LongTensor[batch, k] of distinct positions, which decides alone.
    seed: seeds the random selector's own generator (None: torch's global RNG).
    loss_on_selected: with token-level labels ([batch, T]: causal LM,
        token classification), only the selected positions' loss terms count
        (for a causal LM, those predicted *at* a selected position) — the
        paper's setting. Without it, the loss averages over every token and
        only the selected ones send gradients.
    """

    k: int | None = None
    fraction: float | None = None
    keep: str | Sequence[int] = "auto"
    selector: str | Selector = "random"
    seed: int | None = None
    loss_on_selected: bool = False
    method: str = field(default="tokentune", init=False)

    def __post_init__(self):
        where = "pypeft.patch(method='tokentune')"
        if self.k is not None and self.fraction is not None:
            raise ValueError(f"{where}: give one of 'k' and 'fraction', got k={self.k} and fraction={self.fraction}")
        if self.k is None and self.fraction is None:
            self.k = 16
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0):
            raise ValueError(f"{where}: argument 'k': expected a positive int, got {self.k!r}")
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0):
                raise ValueError(f"{where}: argument 'fraction': expected a number in (0, 1], got {f!r}")
        if isinstance(self.keep, str):
            if self.keep != "auto":
                raise ValueError(f"{where}: argument 'keep': expected 'auto' or a sequence of ints, got {self.keep!r}")
        else:
            keep = tuple(self.keep)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
                raise ValueError(f"{where}: argument 'keep': expected 'auto' or a sequence of ints, got {self.keep!r}")
            self.keep = keep
        if not (self.selector == "random" or callable(self.selector)):
            raise ValueError(f"{where}: argument 'selector': expected 'random' or a callable "
                             f"(input_ids, attention_mask, k) -> LongTensor[batch, k], got {self.selector!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{where}: argument 'seed': expected an int or None, got {self.seed!r}")

    def tokens_for(self, length: int) -> int:
        """k for a batch of sequence length T."""
        if self.fraction is not None:
            return max(1, min(length, math.ceil(self.fraction * length)))
        return min(self.k, length)


def is_decoder(model: nn.Module) -> bool:
    """Whether the model's attention is causal (its modules say is_causal)."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _random_positions(mask: torch.Tensor, k: int, keep: Sequence[int],
                      generator: torch.Generator | None) -> torch.Tensor:
    """[B, k]: per row, the `keep` positions (among non-padding tokens) and
    others uniformly at random among non-padding tokens; padding only fills
    rows with fewer than k tokens (it then carries no gradient anyway)."""
    B, T = mask.shape
    scores = torch.rand(B, T, generator=generator)
    valid = mask.cpu()
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    rank = valid.long().cumsum(1) - 1  # index among the non-padding tokens
    lengths = valid.sum(1, keepdim=True)
    for i in keep:
        target = torch.full_like(lengths, i) if i >= 0 else lengths + i
        scores = torch.where(valid & (rank == target), torch.full_like(scores, 2.0), scores)
    return scores.topk(k, dim=1).indices.sort(1).values


class TokenSelection:
    """The tokens of the current training forward, shared by every
    token-subset module of one model. `positions` is set by a pre-hook on the
    model's forward (training mode with grad enabled only) and cleared after."""

    def __init__(self, config: TokenTuneConfig, model: nn.Module):
        self.config = config
        self.keep = ((0, -1) if is_decoder(model) else (0,)) if config.keep == "auto" else tuple(config.keep)
        self.causal = is_decoder(model)
        self.generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self.positions: torch.Tensor | None = None
        self.tokens = 0  # T of the current selection
        self._signature = inspect.signature(model.forward)

    def positions_for(self, x: torch.Tensor, token_dim: int = 1) -> torch.Tensor | None:
        """The positions when a selection is active and x is [B, T, ...] of it
        (dims 0 and token_dim); None otherwise (the module runs unchanged)."""
        p = self.positions
        if p is None or x.dim() <= max(token_dim, 1) or x.shape[0] != p.shape[0]:
            return None
        return p if x.shape[token_dim] == self.tokens else None

    # --- choosing ---------------------------------------------------------------------

    def choose(self, input_ids, attention_mask, batch: int, tokens: int, device) -> torch.Tensor:
        k = self.config.tokens_for(tokens)
        if callable(self.config.selector):
            got = self.config.selector(input_ids, attention_mask, k)
            return self._checked(got, batch, tokens, k).to(device)
        if attention_mask is None:
            mask = torch.ones(batch, tokens, dtype=torch.bool)
        else:
            mask = attention_mask.detach().to("cpu").bool()
        return _random_positions(mask, k, self.keep, self.generator).to(device)

    @staticmethod
    def _checked(got, batch: int, tokens: int, k: int) -> torch.Tensor:
        where = "pypeft.patch(method='tokentune'): argument 'selector'"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.int64:
            raise ValueError(f"{where}: expected it to return an int64 tensor [batch, k], got "
                             f"{got.dtype if isinstance(got, torch.Tensor) else type(got).__name__}")
        if tuple(got.shape) != (batch, k):
            raise ValueError(f"{where}: expected positions of shape [{batch}, {k}], got {list(got.shape)}")
        if got.numel() and (got.min() < 0 or got.max() >= tokens):
            raise ValueError(f"{where}: expected positions in [0, {tokens}), got values in "
                             f"[{got.min().item()}, {got.max().item()}]")
        ordered = got.sort(1).values
        if k > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"{where}: expected distinct positions in each row, got a repeated one")
        return ordered

    # --- the hooks on the model's forward --------------------------------------------------

    def before_forward(self, model: nn.Module, args, kwargs):
        self.positions = None
        if not (model.training and torch.is_grad_enabled()):
            return None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        input_ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        if shaped is None or shaped.dim() < 2:
            return None
        batch, tokens = shaped.shape[0], shaped.shape[1]
        attention_mask = bound.get("attention_mask")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, tokens):
            attention_mask = None  # a 4-D mask the model builds on: select among all tokens
        self.tokens = tokens
        self.positions = self.choose(input_ids, attention_mask, batch, tokens, shaped.device)
        labels = bound.get("labels")
        if self.config.loss_on_selected and isinstance(labels, torch.Tensor) and tuple(labels.shape) == (batch, tokens):
            return self._with_labels(args, kwargs, self._selected_labels(labels))
        return None

    def _with_labels(self, args, kwargs, labels):
        if "labels" in kwargs:
            return args, {**kwargs, "labels": labels}
        index = list(self._signature.parameters).index("labels")
        return (*args[:index], labels, *args[index + 1:]), kwargs

    def after_forward(self, *unused):
        self.positions = None

    def _selected_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """labels with every term outside the selection set to -100 (ignored).
        For a causal LM, label t + 1 is predicted at position t."""
        selected = torch.zeros_like(labels, dtype=torch.bool).scatter_(1, self.positions, True)
        keep = selected
        if self.causal:
            keep = torch.zeros_like(selected)
            keep[:, 1:] = selected[:, :-1]
        return torch.where(keep, labels, torch.full_like(labels, -100))


# --- attaching to a model --------------------------------------------------------------

@dataclass
class TokenTuneRecord:
    """What attach() changed, so that detach() undoes exactly that."""

    config: TokenTuneConfig
    selection: TokenSelection
    swapped: list[nn.Module]
    tagged: list[nn.Module]  # attention modules that read the selection
    hooks: list
    attn_implementation: str | None


def _plan(model: nn.Module) -> tuple[list[tuple[nn.Module, type]], list[nn.Module]]:
    """(module, mixin) pairs to swap and the attention modules to tag; raises,
    before anything changes, on a module with parameters TokenTune cannot run
    token by token (its weight gradient would include unselected tokens)."""
    from pypeft.methods.adapted_linear import AdaptedLinear

    adapter_layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    inside = tuple(name + "." for name in adapter_layers)
    embedding = model.get_input_embeddings()
    swaps, attention, unknown = [], [], []
    for name, module in model.named_modules():
        if name in adapter_layers:
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
            attention.append(module)
        elif not isinstance(module, nn.Embedding) and any(True for _ in module.parameters(recurse=False)):
            unknown.append(f"{name} ({type(module).__name__})")
    if unknown:
        raise ValueError("pypeft.patch(method='tokentune'): these modules hold parameters but TokenTune does not know "
                         f"how to run them token by token: {', '.join(unknown)}")
    return swaps, attention + list(adapter_layers.values())


def attach(model: nn.Module, config: TokenTuneConfig) -> TokenTuneRecord:
    from pypeft.models import token_subset_attention

    where = "pypeft.patch(method='tokentune')"
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if getattr(model, "config", None) is None or can_set is None or not can_set():
        raise ValueError(f"{where}: argument 'model': expected a transformers model that computes attention through "
                         f"transformers' AttentionInterface, got {type(model).__name__}")
    if model.get_input_embeddings() is None:
        raise ValueError(f"{where}: argument 'model': {type(model).__name__} has no input embedding")
    swaps, tagged = _plan(model)
    selection = TokenSelection(config, model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(token_subset_attention.register())
    for module, mixin in swaps:
        tsm.swap(module, mixin, selection)
    for module in tagged:
        setattr(module, tsm.SELECTION_ATTR, selection)
    hooks = [model.register_forward_pre_hook(selection.before_forward, with_kwargs=True),
             model.register_forward_hook(selection.after_forward, always_call=True)]
    return TokenTuneRecord(config, selection, [m for m, _ in swaps], tagged, hooks, previous)


def tag_new_layers(model: nn.Module, record: TokenTuneRecord) -> None:
    """Give adapter layers added after TokenTune (and their base layers) the selection."""
    from pypeft.methods.adapted_linear import AdaptedLinear

    for module in model.modules():
        if isinstance(module, AdaptedLinear) and getattr(module, tsm.SELECTION_ATTR, None) is None:
            setattr(module, tsm.SELECTION_ATTR, record.selection)
            record.tagged.append(module)
            base = module.base_layer
            if not tsm.is_swapped(base):
                tsm.swap(base, tsm.TokenSubsetLinear, record.selection)
                record.swapped.append(base)


def detach(model: nn.Module, record: TokenTuneRecord) -> None:
    for hook in record.hooks:
        hook.remove()
    for module in record.swapped:
        if tsm.is_swapped(module):
            tsm.unswap(module)
    for module in record.tagged:
        module.__dict__.pop(tsm.SELECTION_ATTR, None)
    model.set_attn_implementation(record.attn_implementation)
