"""The bottleneck adapters at one sublayer exit (pypeft/models/sublayers.py),
and the two hooks that put them into the model's forward.

A BottleneckSite is a child of the transformer layer
(`<layer>.pypeft_bottleneck.<attention|feed_forward>`) holding the named
adapters for that exit. A forward pre-hook on the module receiving the
residual stream x records x for this thread; a forward hook on the module
whose output is the sublayer's output h replaces h with h + δ, so the block's
own residual add (and, post-LN, its norm) then computes what the `adapters`
library computes:

    houlsby-like   δ = A(h)                   block: norm(h + A(h) + x)
    pfeiffer       δ = A(norm(h + x))         block: norm(h + A(norm(h + x)) + x)
    parallel       δ = A(x)                   block: norm(h + A(x) + x)

with A(z) = dropout(s · (W_up act(W_down z + b_down) + b_up)) (pre-LN
families have no norm there: norm is the identity). The hooks are objects,
not closures, so deepcopy and pickle of the model carry them to the copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pypeft.layer import BASE, PerThread, PypeftLayer
from pypeft.methods.adapted_linear import AdaptedLinear
from pypeft.methods.bottleneck.config import BottleneckConfig
from pypeft.ops.adapter_fusion import adapter_fusion
from pypeft.ops.bottleneck_adapter import bottleneck_adapter

# What the adapter reads: the sublayer's output h, norm(h + x), or the sublayer's input x.
OUTPUT, NORMED_SUM, INPUT = "output", "normed_sum", "input"


@dataclass(frozen=True)
class Settings:
    """What one adapter at a site computes, beside its weights."""

    reads: str
    scaling: float
    activation: str
    dropout: float

    @classmethod
    def of(cls, config: BottleneckConfig) -> "Settings":
        reads = INPUT if config.is_parallel else NORMED_SUM if config.original_ln_before else OUTPUT
        return cls(reads, config.scaling, config.activation, config.dropout)


class BottleneckWeights(nn.Module):
    """One adapter's weights at one site, laid out as nn.Linear's
    (down: [m, d], up: [d, m]), initialised as the adapters library does."""

    def __init__(self, hidden: int, bottleneck: int, init: str, dtype, device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.down_weight = nn.Parameter(torch.empty(bottleneck, hidden, **kw))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **kw))
        self.up_weight = nn.Parameter(torch.empty(hidden, bottleneck, **kw))
        self.up_bias = nn.Parameter(torch.zeros(hidden, **kw))
        with torch.no_grad():
            if init == "bert":
                self.down_weight.normal_(0.0, 0.02)
                self.up_weight.normal_(0.0, 0.02)
            elif init == "houlsby":
                nn.init.trunc_normal_(self.down_weight, 0.0, 1e-2, -2e-2, 2e-2)
                nn.init.trunc_normal_(self.up_weight, 0.0, 1e-2, -2e-2, 2e-2)
            else:  # mam_adapter: the up projection starts at zero, so the model starts as the base
                nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
                self.up_weight.zero_()


class FusionWeights(nn.Module):
    """One AdapterFusion's weights at one site (Pfeiffer et al. 2021): query
    and key [d, d] with biases, value [d, d] without one (or none: "static"),
    initialised as the adapters library does (N(0, 0.02), zero biases; the
    value near the identity when value_initialized)."""

    def __init__(self, hidden: int, value: bool, value_initialized: bool, dtype, device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.query_weight = nn.Parameter(torch.empty(hidden, hidden, **kw).normal_(0.0, 0.02))
        self.query_bias = nn.Parameter(torch.zeros(hidden, **kw))
        self.key_weight = nn.Parameter(torch.empty(hidden, hidden, **kw).normal_(0.0, 0.02))
        self.key_bias = nn.Parameter(torch.zeros(hidden, **kw))
        self.value_weight = None
        if value:
            init = torch.full((hidden, hidden), 1e-6, **kw).fill_diagonal_(1.0) if value_initialized else \
                torch.empty(hidden, hidden, **kw).normal_(0.0, 0.02)
            self.value_weight = nn.Parameter(init)


@dataclass
class FusionSettings:
    adapters: tuple[str, ...]
    query_before_ln: bool
    dropout: float
    temperature: float        # the current T (starts at 50 with the schedule, else 1)
    temperature_step: float   # subtracted after every forward, down to 1 (the library's schedule)


class BottleneckSite(PypeftLayer):
    """The bottleneck adapters, and the fusions of them, at one sublayer exit.

    Under TokenTune (which tags the site with its token selection) the
    adapter runs on every token but keeps for backward only the selected
    tokens' rows: the others' δ is computed without autograd, as TokenTune's
    own token-subset ops do for the backbone."""

    runs_token_subsets = True

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.settings: dict[str, Settings] = {}
        self.fusion_settings: dict[str, FusionSettings] = {}
        self.active: str | None = None
        self.captured = PerThread()  # x, recorded by the residual hook for this thread's forward

    # --- lifecycle -----------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return [*self.adapters, *self.fusions]

    def add_adapter(self, name: str, config: BottleneckConfig, bottleneck: int, dtype, device) -> None:
        self.adapters[name] = BottleneckWeights(self.hidden, bottleneck, config.init_weights, dtype, device)
        self.settings[name] = Settings.of(config)

    def add_fusion(self, name: str, settings: FusionSettings, value: bool, value_initialized: bool, dtype,
                   device) -> None:
        self.fusions[name] = FusionWeights(self.hidden, value, value_initialized, dtype, device)
        self.fusion_settings[name] = settings

    def activate(self, name: str | None) -> None:
        """Train only `name`: an adapter, or a fusion (its adapters stay frozen)."""
        self.active = name if name in self.adapters or name in self.fusions else None
        for key, weights in (*self.adapters.items(), *self.fusions.items()):
            weights.requires_grad_(key == self.active)

    def delete_adapter(self, name: str) -> None:
        if name in self.fusions:
            del self.fusions[name]
            del self.fusion_settings[name]
        else:
            del self.adapters[name]
            del self.settings[name]
        if self.active == name:
            self.active = None

    def reads(self, name: str) -> str:
        """What adapter or fusion `name` reads (a fusion: as its last adapter, as the library)."""
        if name in self.fusion_settings:
            return self.settings[self.fusion_settings[name].adapters[-1]].reads
        return self.settings[name].reads

    def needs_residual(self) -> bool:
        return any(self.reads(n) != OUTPUT for n in self.adapter_names())

    # --- forward -------------------------------------------------------------------
    def forward(self, h: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """h + δ for this thread's active adapter (or mixed rows); h itself
        when disabled or no adapter of this site is active."""
        x = getattr(self.captured, "x", None)
        self.captured.x = None  # not kept alive past the forward that recorded it
        if self.is_disabled():
            return h
        rows = self.mixed_rows()
        if rows is not None:
            return self._mixed_forward(h, x, norm, rows)
        if self.active is None:
            return h
        positions = self.token_positions(h) if torch.is_grad_enabled() else None
        if positions is not None:
            return self._token_subset_forward(self.active, h, x, norm, positions)
        return self._adapter_forward(self.active, h, x, norm)

    def _token_subset_forward(self, name: str, h, x, norm, positions: torch.Tensor) -> torch.Tensor:
        """h + δ where only the selected tokens' δ (positions: [B, k]) takes part in backward."""
        with torch.no_grad():
            delta = self._adapter_forward(name, h, x, norm) - h
        index = positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        pick = lambda t: None if t is None else t.gather(1, index)  # noqa: E731
        h_sel = pick(h)
        delta_sel = self._adapter_forward(name, h_sel, pick(x), norm) - h_sel
        return h + delta.scatter(1, index, delta_sel)

    def _adapter_input(self, name: str, h, x, norm) -> torch.Tensor:
        reads = self.reads(name)
        if reads == OUTPUT:
            return h
        if x is None:
            raise RuntimeError("pypeft: a bottleneck adapter that reads the residual stream ran without it; the "
                               "residual hook did not run (was the model's forward changed after patching?)")
        if reads == INPUT:
            return x
        return h + x if norm is None else norm(h + x)

    def _adapter_forward(self, name: str, h, x, norm) -> torch.Tensor:
        if name in self.fusions:
            return self._fusion_forward(name, h, x, norm)
        s = self.settings[name]
        z = self._adapter_input(name, h, x, norm)
        w = self.adapters[name]
        p = s.dropout if self.training else 0.0
        return bottleneck_adapter(z, h, w.down_weight, w.down_bias, w.up_weight, w.up_bias, s.scaling,
                                  s.activation, p, AdaptedLinear.dropout_seed(p, h))

    def _fusion_forward(self, name: str, h, x, norm) -> torch.Tensor:
        """The library's compose_fuse: every fused adapter reads what the last
        one reads; the query is that too (or h, with query_before_ln); the
        fusion's output goes where one adapter's would (residual h)."""
        f = self.fusion_settings[name]
        z = self._adapter_input(name, h, x, norm)
        query = h if f.query_before_ln else z
        weights = [self.adapters[a] for a in f.adapters]
        m = max(w.down_weight.shape[0] for w in weights)
        # Bottlenecks of different sizes stack zero-padded: padded units meet zero up-projection columns.
        w_down = torch.stack([_pad_rows(w.down_weight, m) for w in weights])
        b_down = torch.stack([_pad_rows(w.down_bias, m) for w in weights])
        w_up = torch.stack([_pad_rows(w.up_weight.t(), m).t() for w in weights])
        b_up = torch.stack([w.up_bias for w in weights])
        scales = [self.settings[a].scaling for a in f.adapters]
        fw = self.fusions[name]
        p = f.dropout if self.training else 0.0
        temperature = f.temperature
        if f.temperature_step:
            f.temperature = max(f.temperature - f.temperature_step, 1.0)
        return adapter_fusion(z, query, h, w_down, b_down, w_up, b_up, scales,
                              self.settings[f.adapters[0]].activation, fw.query_weight, fw.query_bias,
                              fw.key_weight, fw.key_bias, fw.value_weight, temperature, p,
                              AdaptedLinear.dropout_seed(p, h))

    def _mixed_forward(self, h, x, norm, rows: list[str]) -> torch.Tensor:
        if len(rows) != h.shape[0]:
            raise ValueError(f"pypeft.mixed_batch: {len(rows)} adapter names for a batch of {h.shape[0]} rows")
        out = h
        for name in dict.fromkeys(rows):
            if name == BASE or name not in self.adapters:
                continue
            index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=h.device)
            part = self._adapter_forward(name, h.index_select(0, index),
                                         None if x is None else x.index_select(0, index), norm)
            out = out.index_copy(0, index, part)
        return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


class ResidualHook:
    """Forward pre-hook on the module receiving the residual stream: records x."""

    def __init__(self, site: BottleneckSite, arg: int, kwarg: str):
        self.site, self.arg, self.kwarg = site, arg, kwarg

    def __call__(self, module, args, kwargs):
        self.site.captured.x = args[self.arg] if len(args) > self.arg else kwargs.get(self.kwarg)


class ExitHook:
    """Forward hook on the module whose output is the sublayer's output h."""

    def __init__(self, site: BottleneckSite, norm: nn.Module | None):
        self.site, self.norm = site, norm

    def __call__(self, module, args, output):
        return self.site(output, self.norm)
