"""What every pypeft linear-layer method shares: a frozen base layer (nn.Linear
or transformers' Conv1D) plus named adapters, one (or none) active, and the
lifecycle around them (merge/unmerge, disable, activate, delete, mixed-adapter
batches). A method (LoRA, VeRA) says what an adapter holds and how it runs.
"""

from __future__ import annotations

import abc
import warnings
from typing import Iterator

import torch
from torch import nn

from pypeft.layer import BASE, PypeftLayer
from pypeft.models.linear import compute_dtype, is_linear_like, is_quantized, is_transposed, linear_dims


def default_adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """PEFT's autocast_adapter_dtype: float32 adapters on a bfloat16/float16 layer
    (`dtype`: the layer's compute dtype, pypeft.models.linear.compute_dtype)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class AdaptedLinear(PypeftLayer, abc.ABC):
    """Subclasses hold their adapters' tensors in ParameterDicts keyed by
    adapter name, list those dicts in `adapter_dicts`, and implement
    `delta_weight(name)` ([out, in]), `_adapter_forward(x, name, positions)`
    and `_mixed_forward(x, names, rows)`."""

    adapter_dicts: tuple[str, ...] = ()
    method = ""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"{type(self).__name__}: argument 'base': expected torch.nn.Linear or transformers "
                            f"Conv1D, got {type(base).__name__}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.active_adapter: str | None = None
        self.merged: list[str] = []  # the adapter folded into base_layer's weight (at most one)
        self._premerge_weight = None  # the weight (a quantised base: its storage) before merge(), for unmerge()
        # A quantised base is requantised with the update folded in: the
        # rounding that caused ({"max_abs", "relative_to_update",
        # "relative_to_weight"}), or None (a dense merge is exact up to the dtype).
        self.merge_error: dict | None = None

    @property
    def in_features(self) -> int:
        return linear_dims(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.base_layer)[1]

    # Model code reads these off the layer it calls (e.g. T5 checks `wo.weight.dtype`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_dicts[0]))

    def has_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_dicts[0])

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return (getattr(self, d)[name] for d in self.adapter_dicts)

    def _check_new_name(self, name: str) -> None:
        if self.has_adapter(name):
            raise ValueError(f"{type(self).__name__}: adapter {name!r} exists already "
                             f"(adapters: {sorted(self.adapter_names())})")

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter that runs and trains; the others are frozen."""
        self.active_adapter = name
        for adapter in self.adapter_names():
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(adapter == name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        for d in self.adapter_dicts:
            del getattr(self, d)[name]
        self._forget(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def _forget(self, name: str) -> None:
        """Drop a deleted adapter's non-tensor settings."""

    # --- merging ------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        name = self.active_adapter
        if name is None or not self.has_adapter(name) or self.merged:
            return
        if is_quantized(self.base_layer):
            self._merge_quantized(name)
            return
        w = self.base_layer.weight
        # Rounding the sum to w's dtype loses bits that subtracting the update
        # again cannot restore (bfloat16 drifted visibly over switches): keep
        # the weight itself while merged, so unmerge() is exact in every dtype.
        self._premerge_weight = w.detach().clone()
        delta = self.delta_weight(name)
        d = delta.t() if is_transposed(self.base_layer) else delta
        w.copy_((w.to(d.dtype) + d).to(w.dtype))
        self.merged = [name]

    def _merge_quantized(self, name: str) -> None:
        """Dequantise, add the update, requantise; keep the stored codes so
        that unmerge() gives them back bit for bit, and measure what the
        requantisation rounded away."""
        base = self.base_layer
        self._premerge_weight = base.storage_snapshot()
        delta = self.delta_weight(name)
        target = base.dequantized_weight(delta.dtype) + delta
        base.quantize_(target.to(base.weight_dtype))
        err = base.dequantized_weight(delta.dtype) - target
        tiny = torch.finfo(delta.dtype).tiny
        self.merge_error = {"max_abs": float(err.abs().max()) if err.numel() else 0.0,
                            "relative_to_update": float(err.norm() / delta.norm().clamp_min(tiny)),
                            "relative_to_weight": float(err.norm() / target.norm().clamp_min(tiny))}
        self.merged = [name]

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if is_quantized(self.base_layer):
            self.base_layer.restore_storage(self._premerge_weight)
        else:
            self.base_layer.weight.copy_(self._premerge_weight)
        self._premerge_weight = None
        self.merge_error = None
        self.merged = []

    @abc.abstractmethod
    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update as an [out, in] matrix (what merge() adds)."""

    # --- running --------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_disabled():
            return self.base_layer(x)
        row_names = self.mixed_rows()
        if row_names is not None:
            return self._mixed_rows_forward(x, row_names)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                warnings.warn("pypeft: training a model with merged adapters: the merged layers run their base "
                              "weights only, so the adapters get no gradient; call pypeft.unmerge(model) before "
                              "training", stacklevel=2)
            return self.base_layer(x)
        name = self.active_adapter
        if name is None or not self.has_adapter(name):
            return self.base_layer(x)
        return self._in_compute_dtype(x, lambda xc: self._adapter_forward(xc, name, self.token_positions(xc)))

    def _in_compute_dtype(self, x: torch.Tensor, run) -> torch.Tensor:
        """run(x) where x is in the base's compute dtype. A quantised base may
        compute in another dtype than the activations (bnb's compute_dtype):
        the fused op runs there and the result comes back in x's dtype, as
        the quantised layer's own forward does."""
        if not is_quantized(self.base_layer):
            return run(x)
        dtype = compute_dtype(self.base_layer)
        if x.dtype == dtype:
            return run(x)
        return run(x.to(dtype)).to(x.dtype)

    def _mixed_rows_forward(self, x: torch.Tensor, row_names: list[str]) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != len(row_names):
            raise ValueError(f"pypeft.mixed_batch: argument 'adapter_names': expected one name per batch row "
                             f"({x.shape[0] if x.dim() >= 2 else 'no batch dimension'}), got {len(row_names)}")
        # Adapters this layer does not hold leave their rows at the base.
        present = [n for n in dict.fromkeys(row_names) if n != BASE and self.has_adapter(n)]
        if not present:
            return self.base_layer(x)
        index = {n: i for i, n in enumerate(present)}
        out = self._in_compute_dtype(x, lambda xc: self._mixed_forward(xc, present,
                                                                       [index.get(n, -1) for n in row_names]))
        # A base that stands in for the linear layer (BitFit's) runs with the
        # base bias here; rows of its adapters get their bias difference added.
        inner = self.base_layer
        deltas = inner.row_bias_deltas(row_names) if isinstance(inner, PypeftLayer) else None
        if deltas is not None:
            out = out + deltas.view(deltas.shape[0], *[1] * (out.dim() - 2), deltas.shape[-1]).to(out.dtype)
        return out

    @abc.abstractmethod
    def _adapter_forward(self, x: torch.Tensor, name: str, positions: torch.Tensor | None) -> torch.Tensor:
        """The base layer plus adapter `name`, in one native op; with
        positions (a token selection is active), its token-subset op."""

    @abc.abstractmethod
    def _mixed_forward(self, x: torch.Tensor, names: list[str], rows: list[int]) -> torch.Tensor:
        """Each batch row with adapter names[rows[i]] (-1: none), in one native op."""

    @staticmethod
    def dropout_seed(p: float, x: torch.Tensor) -> torch.Tensor | None:
        # A fresh mask every step; the seed is a tensor so that torch.compile
        # keeps one graph while it changes.
        return torch.randint(0, 2**62, (), device=x.device) if p > 0.0 else None
