"""BitFit's layer: a frozen module (nn.Linear, nn.LayerNorm, transformers'
Conv1D, nn.Conv*, ...) whose bias is replaced, per adapter, by a trained one.

The original bias is never written to while an adapter trains: each adapter
holds its own bias beside it (a copy of the original at first, or zeros
where the module had none and add_missing_biases asked for one), so
pypeft.disabled() and pypeft.unpatch() give the base exactly. merge() copies
the active adapter's bias into the module (adding the parameter where it had
none) and unmerge() puts back exactly what was there.

The layer stands for its base (PypeftLayer.stands_for_base): its `weight`
is the base's and its `bias` the one it runs with, so a LoRA or VeRA layer
can wrap it and run its fused op with the trained bias, and TokenTune runs
it as the module it wraps.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pypeft.layer import BASE, PypeftLayer
from pypeft.models.linear import compute_dtype


def bias_slot(module: nn.Module) -> str | None:
    """'bias' if the module has a bias parameter, 'missing' if it declares
    the slot but holds none (nn.Linear(bias=False): its `bias` is None), or
    None if it has no bias at all (RMSNorm, Embedding)."""
    if "bias" not in module._parameters:
        return None
    return "bias" if module._parameters["bias"] is not None else "missing"


def missing_bias_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The shape a bias added to a bias-less module takes (None: a kind of
    module whose bias BitFit does not know how to add)."""
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    if isinstance(module, nn.modules.conv._ConvNd):
        return (module.out_channels,)
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return tuple(module.normalized_shape)
    return None


def _bias_dim(module: nn.Module) -> int | None:
    """The output dimension a module's bias is added along, where a mixed batch
    can add per-row bias differences to the base output (None: run the rows
    per adapter)."""
    if isinstance(module, nn.LayerNorm):
        return -1 if len(module.normalized_shape) == 1 else None
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return -1
    return None


class BitFitLayer(PypeftLayer):
    """A frozen module plus named trained biases; the active one runs in place
    of the module's own bias."""

    stands_for_base = True

    def __init__(self, base: nn.Module):
        super().__init__()
        if bias_slot(base) is None:
            raise TypeError(f"BitFitLayer: argument 'base': expected a module with a bias parameter (or a bias slot "
                            f"that is None), got {type(base).__name__}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.bitfit_bias = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        # What merge() replaced: the base's bias tensor (a copy), or None where it had none.
        self._premerge_bias: torch.Tensor | None = None

    # --- adapters -----------------------------------------------------------------
    def add_adapter(self, name: str, shape: tuple[int, ...] | None = None) -> None:
        """A trained bias for adapter `name`: a copy of the base's own, or zeros
        of `shape` where the base has none."""
        if name in self.bitfit_bias:
            raise ValueError(f"BitFitLayer: adapter {name!r} exists already (adapters: {sorted(self.bitfit_bias)})")
        if self.merged:  # patch() and load_adapter() refuse a merged model before this
            raise ValueError("BitFitLayer: the layer is merged; unmerge() before adding an adapter")
        original = self.base_layer.bias
        if original is not None:
            bias = original.detach().clone()
        else:
            if shape is None:
                raise ValueError(f"BitFitLayer: {type(self.base_layer).__name__} has no bias; argument 'shape': "
                                 "expected the shape of the bias to add, got None")
            bias = torch.zeros(shape, dtype=compute_dtype(self.base_layer), device=self.base_layer.weight.device)
        self.bitfit_bias[name] = nn.Parameter(bias)

    def adapter_names(self) -> list[str]:
        return list(self.bitfit_bias)

    def activate(self, name: str | None) -> None:
        self.active_adapter = name
        for adapter, bias in self.bitfit_bias.items():
            bias.requires_grad_(adapter == name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        del self.bitfit_bias[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # --- what other code reads off the layer ----------------------------------------
    @property
    def adds_bias(self) -> bool:
        """Whether the wrapped module had no bias of its own."""
        return self._premerge_bias is None if self.merged else self.base_layer.bias is None

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias the layer runs with now (the base's when disabled, merged,
        in a mixed batch or with no adapter active)."""
        name = self.active_adapter
        if self.merged or name is None or name not in self.bitfit_bias or self.is_disabled() \
                or self.mixed_rows() is not None:
            return self.base_layer.bias
        return self.bitfit_bias[name]

    def __getattr__(self, name: str):
        # Model code reads attributes off the module it calls (weight,
        # in_features, normalized_shape, eps, nf, ...): the base's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None:  # half-built (copy, unpickling): nothing to defer to
                raise
            return getattr(base, name)

    # --- merging --------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        name = self.active_adapter
        if name is None or name not in self.bitfit_bias or self.merged:
            return
        base, trained = self.base_layer, self.bitfit_bias[name]
        if base.bias is None:
            self._premerge_bias = None
            base.bias = nn.Parameter(trained.detach().clone(), requires_grad=False)
        else:
            self._premerge_bias = base.bias.detach().clone()
            base.bias.copy_(trained)
        self.merged = [name]

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._premerge_bias is None:
            self.base_layer.bias = None
        else:
            self.base_layer.bias.copy_(self._premerge_bias)
        self._premerge_bias = None
        self.merged = []

    # --- running --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.is_disabled():
            return self.base_layer(x, *args, **kwargs)
        row_names = self.mixed_rows()
        if row_names is not None:
            return self._mixed_rows_forward(x, row_names, *args, **kwargs)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                warnings.warn("pypeft: training a model with merged adapters: the merged layers run their base "
                              "weights only, so the adapters get no gradient; call pypeft.unmerge(model) before "
                              "training", stacklevel=2)
            return self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name not in self.bitfit_bias:
            return self.base_layer(x, *args, **kwargs)
        return self.run_with_bias(x, self.bitfit_bias[name], *args, **kwargs)

    def run_with_bias(self, x: torch.Tensor, bias: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base module's forward with `bias` in place of its own."""
        base = self.base_layer
        # Plain Linear / LayerNorm (exact types: TokenTune's token-subset
        # subclasses must run their own forward) take the functional op
        # directly, which torch.compile traces with no graph break.
        if type(base) is nn.Linear and not args and not kwargs:
            return F.linear(x, base.weight, bias)
        if type(base) is nn.LayerNorm and not args and not kwargs:
            return F.layer_norm(x, base.normalized_shape, base.weight, bias, base.eps)
        return torch.func.functional_call(base, {"bias": bias}, (x, *args), kwargs, strict=False)

    def row_bias_deltas(self, row_names: list[str]) -> torch.Tensor | None:
        """[rows, *bias shape]: each row's trained bias minus the base's (zero
        for rows with no adapter of this layer), or None when no row names an
        adapter of this layer. A LoRA/VeRA layer wrapping this one adds these
        to its mixed-batch output."""
        present = [n for n in dict.fromkeys(row_names) if n != BASE and n in self.bitfit_bias]
        if not present:
            return None
        base = self.base_layer.bias
        trained = torch.stack([self.bitfit_bias[n] for n in present])
        deltas = trained - base if base is not None else trained
        deltas = torch.cat([deltas, deltas.new_zeros((1, *deltas.shape[1:]))])  # the last row: no change
        index = {n: i for i, n in enumerate(present)}
        rows = torch.tensor([index.get(n, len(present)) for n in row_names], device=deltas.device)
        return deltas.index_select(0, rows)

    def _mixed_rows_forward(self, x: torch.Tensor, row_names: list[str], *args, **kwargs) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != len(row_names):
            raise ValueError(f"pypeft.mixed_batch: argument 'adapter_names': expected one name per batch row "
                             f"({x.shape[0] if x.dim() >= 2 else 'no batch dimension'}), got {len(row_names)}")
        deltas = self.row_bias_deltas(row_names)
        if deltas is None:
            return self.base_layer(x, *args, **kwargs)
        dim = _bias_dim(self.base_layer)
        y = self.base_layer(x, *args, **kwargs)
        if dim is not None and deltas.dim() == 2:
            # The bias is added along one output dimension: add each row's
            # difference to the base output, in one pass over the batch.
            dim = dim % y.dim()
            shape = [1] * y.dim()
            shape[0], shape[dim] = y.shape[0], y.shape[dim]
            return y + deltas.view(shape).to(y.dtype)
        return self._mixed_rows_by_group(x, row_names, y, *args, **kwargs)

    def _mixed_rows_by_group(self, x, row_names, y, *args, **kwargs) -> torch.Tensor:
        """Modules of other kinds: run the rows of each adapter together."""
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(row_names):
            if name != BASE and name in self.bitfit_bias:
                groups.setdefault(name, []).append(row)
        out = y.clone()
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            out.index_copy_(0, index, self.run_with_bias(x.index_select(0, index), self.bitfit_bias[name],
                                                         *args, **kwargs))
        return out

    def extra_repr(self) -> str:
        added = " (added)" if self.base_layer.bias is None or (self.merged and self._premerge_bias is None) else ""
        return f"adapters={list(self.bitfit_bias)}{added}, active={self.active_adapter!r}"
