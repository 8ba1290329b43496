"""Bottleneck adapters and AdapterFusion written the plain way, as the
`adapters` library (AdapterHub 1.3) composes them from nn modules, put into a
transformers BERT: the eager baseline of bench_bottleneck.py.

Written from the library's math (tests/adapters_oracle/FORMAT.md, "Where the
adapters sit" and "AdapterFusion"), not imported from it: Adapter is
nn.Sequential(nn.Linear down, activation module), nn.Linear up, a scaling, an
nn.Dropout on the scaled up-projection and the residual add; BertFusion is
query / key / value nn.Linear over the stacked up-projections, dropout on the
scores, softmax. Each adapted BertSelfOutput / BertOutput is swapped for
AdaptedOutput, which runs the module's own dense and dropout to get h and then
the library's bottleneck_layer_forward(h, x, LayerNorm) in place of
LayerNorm(h + x):

    pfeiffer (seq_bn)        LN(A(LN(h + x)) + h + x)
    houlsby (double_seq_bn)  LN(A(h) + h + x)          at both sublayers
    fusion of pfeiffers      LN(Fuse(LN(h + x)) + h + x), the query = LN(h + x)

(post-norm only: the MiniLM-shaped BERT of the benchmarks.)
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}
# The presets as the library defines them (the fields this file runs).
PRESETS = {
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu",
                     original_ln_before=True, scaling=1.0),
    "houlsby": dict(mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="swish",
                    original_ln_before=False, scaling=1.0),
}
ATTENTION, FEED_FORWARD = "attention", "feed_forward"


class EagerAdapter(nn.Module):
    """The library's Adapter with the options the presets leave off taken out
    (no LayerNorms of its own, no gating). up() is the scaled up-projection a
    fusion attends over (the library computes the dropped output and its
    residual too and drops them there; this does not, to be fair)."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, scaling: float, dropout: float):
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, bottleneck), ACTIVATIONS[non_linearity]())
        self.adapter_up = nn.Linear(bottleneck, hidden)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_down(x)) * self.scaling

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.up(x)) + residual


class EagerFusion(nn.Module):
    """The library's BertFusion in its "dynamic" preset (query, key, a value
    without bias applied before the softmax, residual after, T = 1)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, ups, residual):  # ups: [batch, tokens, adapters, hidden]
        # ups is stacked contiguous; the library stacks [adapters, batch, tokens, hidden] and permutes, so its
        # key and value Linears each copy it (at MiniLM's size, seq 256, batch 8: 9 MiB more saved per layer).
        q = self.query(query)
        k = self.key(ups)
        v = self.value(ups)
        scores = torch.squeeze(torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)), dim=2)
        probs = torch.softmax(self.dropout(scores), dim=-1)
        return torch.squeeze(torch.matmul(probs.unsqueeze(2), v), dim=2) + residual


class Bottleneck(nn.Module):
    """What replaces LayerNorm(h + x) at one sublayer exit: one adapter, or a
    fusion of several (then every adapter reads what the last one reads, as
    the library's compose_fuse). A module of its own so that a benchmark can
    tell its saved tensors apart by hooks."""

    def __init__(self, original_ln_before: bool):
        super().__init__()
        self.original_ln_before = original_ln_before
        self.adapters = nn.ModuleDict()
        self.fusion: EagerFusion | None = None

    def forward(self, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.LayerNorm) -> torch.Tensor:
        residual = h  # residual_before_ln=True in every preset
        hidden = layer_norm(h + x) if self.original_ln_before else h
        if self.fusion is None:
            (adapter,) = self.adapters.values()
            out = adapter(hidden, residual)
        else:
            ups = torch.stack([adapter.up(hidden) for adapter in self.adapters.values()], dim=2)
            out = self.fusion(hidden, ups, residual)  # query_before_ln=False: the query is `hidden`
        return layer_norm(out + x)  # original_ln_after=True


class AdaptedOutput(nn.Module):
    """BertSelfOutput / BertOutput with the adapter block in place of its
    LayerNorm(h + x). Keeps the original's dense, dropout and LayerNorm."""


    def __init__(self, original: nn.Module, bottleneck: Bottleneck):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = original.dense, original.dropout, original.LayerNorm
        self.bottleneck = bottleneck

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.dropout(self.dense(hidden_states)), input_tensor, self.LayerNorm)


def exits(bert_classifier: nn.Module) -> dict[tuple[int, str], nn.Module]:
    """(layer index, ATTENTION | FEED_FORWARD) -> the layer's BertSelfOutput / BertOutput."""
    found = {}
    for i, layer in enumerate(bert_classifier.bert.encoder.layer):
        found[(i, ATTENTION)] = layer.attention.output
        found[(i, FEED_FORWARD)] = layer.output
    return found


def _install(model: nn.Module, preset: str) -> dict[tuple[int, str], Bottleneck]:
    config = PRESETS[preset]
    blocks = {}
    for (i, where), module in exits(model).items():
        if not config["mh_adapter" if where == ATTENTION else "output_adapter"]:
            continue
        if not isinstance(module, AdaptedOutput):
            module = AdaptedOutput(module, Bottleneck(config["original_ln_before"]))
            parent = model.bert.encoder.layer[i].attention if where == ATTENTION else model.bert.encoder.layer[i]
            parent.output = module
        blocks[(i, where)] = module.bottleneck
    return blocks


def add_adapter(model: nn.Module, name: str, preset: str, dropout: float) -> dict[tuple[int, str], EagerAdapter]:
    """Adds adapter `name` of `preset` at the preset's places, in the model's
    dtype and device (weights: nn.Linear's default init; the benchmark copies
    pypeft's into them)."""
    config = PRESETS[preset]
    hidden = model.config.hidden_size
    weight = model.bert.embeddings.word_embeddings.weight
    added = {}
    for key, block in _install(model, preset).items():
        adapter = EagerAdapter(hidden, int(hidden // config["reduction_factor"]), config["non_linearity"],
                               config["scaling"], dropout).to(dtype=weight.dtype, device=weight.device)
        block.adapters[name] = adapter
        added[key] = adapter
    return added


def add_fusion(model: nn.Module, dropout: float) -> dict[tuple[int, str], EagerFusion]:
    """A fusion over every adapter of each adapted exit (stage 2: call after
    adding the adapters; they are fused in the order they were added)."""
    weight = model.bert.embeddings.word_embeddings.weight
    added = {}
    for key, module in exits(model).items():
        if isinstance(module, AdaptedOutput):
            module.bottleneck.fusion = EagerFusion(model.config.hidden_size, dropout).to(
                dtype=weight.dtype, device=weight.device)
            added[key] = module.bottleneck.fusion
    return added


def bottleneck_blocks(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]
