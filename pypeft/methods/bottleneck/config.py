"""BottleneckConfig: what pypeft.patch(model, method="bottleneck", ...) takes.

The presets are the `adapters` library's (AdapterHub) configs, field for
field, so an adapter moves between the two with the same math:

    preset      adapters' name   where                        act    reduction  extra
    "pfeiffer"  seq_bn           after the feed-forward       relu   16         original_ln_before=True
    "houlsby"   double_seq_bn    after attention and the FFN  swish  16
    "parallel"  par_bn           beside the feed-forward      relu   2          scaling 4.0, zero-init up

Every field left None takes the preset's value; set it to override.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

from pypeft.methods.config_checks import check_common, check_dropout

OWNER = "pypeft.patch(method='bottleneck')"

# The adapters library's preset configs (SeqBnConfig, DoubleSeqBnConfig, ParBnConfig), the fields pypeft runs.
PRESETS: dict[str, dict] = {
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu",
                     original_ln_before=True, is_parallel=False, scaling=1.0, init_weights="bert"),
    "houlsby": dict(mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="swish",
                    original_ln_before=False, is_parallel=False, scaling=1.0, init_weights="bert"),
    "parallel": dict(mh_adapter=False, output_adapter=True, reduction_factor=2, non_linearity="relu",
                     original_ln_before=False, is_parallel=True, scaling=4.0, init_weights="mam_adapter"),
}
PRESET_OF_LIBRARY = {"seq_bn": "pfeiffer", "pfeiffer": "pfeiffer", "double_seq_bn": "houlsby",
                     "houlsby": "houlsby", "par_bn": "parallel", "parallel": "parallel"}

# The adapters library's non_linearity names (transformers' ACT2FN, lower-cased, plus its "leakyrelu")
# -> the activation pypeft's op computes. gelu_new / gelu_fast / gelu_pytorch_tanh are the tanh form.
ACTIVATIONS = {
    "relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "tanh": "tanh", "sigmoid": "sigmoid",
    "leakyrelu": "leaky_relu", "leaky_relu": "leaky_relu", "linear": "identity", "identity": "identity",
}
INITS = ("bert", "houlsby", "mam_adapter")


@dataclass
class BottleneckConfig:
    """Options of pypeft.patch(model, method="bottleneck", ...).

    preset: "pfeiffer" (the default), "houlsby" or "parallel" (or the adapters
        library's names seq_bn, double_seq_bn, par_bn).
    reduction_factor: hidden size / bottleneck size (m = int(d // factor)),
        a number or {"<layer>": factor, ..., "default": factor}.
    non_linearity: the bottleneck's activation (the adapters library's names:
        relu, swish, gelu, gelu_new, tanh, sigmoid, leakyrelu, linear).
    scaling: a float multiplying the adapter's output (He et al. 2021).
    dropout: dropout on the adapter's scaled output, as the adapters library.
    mh_adapter / output_adapter: adapters after the attention / feed-forward
        sublayer. original_ln_before: the adapter reads norm(h + x) instead of
        the sublayer's output h (Pfeiffer). is_parallel: it reads the sublayer's
        input x and adds beside it (He et al.).
    leave_out: layer indices (from 0) that get no adapter.
    init_weights: "bert" (N(0, 0.02), the library's default: a fresh adapter is
        near, not exactly, the base), "houlsby" (truncated N(0, 0.01)) or
        "mam_adapter" (up projection zero: exactly the base).
    modules_to_save: modules trained in full beside it (default: a sequence
        classifier's head).
    """

    preset: str = "pfeiffer"
    reduction_factor: float | Mapping[str, float] | None = None
    non_linearity: str | None = None
    scaling: float | None = None
    dropout: float = 0.0
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    original_ln_before: bool | None = None
    is_parallel: bool | None = None
    leave_out: Sequence[int] = ()
    init_weights: str | None = None
    modules_to_save: list[str] | None = None
    adapter_name: str = "default"
    method: str = field(default="bottleneck", init=False)

    def __post_init__(self):
        preset = PRESET_OF_LIBRARY.get(self.preset) if isinstance(self.preset, str) else None
        if preset is None:
            raise ValueError(f"{OWNER}: argument 'preset': expected one of {sorted(PRESETS)} (or the adapters "
                             f"library's seq_bn, double_seq_bn, par_bn), got {self.preset!r}")
        self.preset = preset
        for key, value in PRESETS[preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_common(OWNER, self)
        check_dropout(OWNER, self.dropout)
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "is_parallel"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{OWNER}: argument '{key}': expected a bool, got {getattr(self, key)!r}")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError(f"{OWNER}: arguments 'mh_adapter' and 'output_adapter' are both False: the adapter "
                             "would sit nowhere")
        if self.is_parallel and self.original_ln_before:
            raise ValueError(f"{OWNER}: argument 'original_ln_before': a parallel adapter reads the sublayer's "
                             "input, so it cannot also read the normed output (expected False with is_parallel)")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in ACTIVATIONS:
            raise ValueError(f"{OWNER}: argument 'non_linearity': expected one of {sorted(ACTIVATIONS)}, "
                             f"got {self.non_linearity!r}")
        self.non_linearity = self.non_linearity.lower()
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or \
                not math.isfinite(self.scaling):
            raise ValueError(f"{OWNER}: argument 'scaling': expected a finite float (a learned or per-channel "
                             f"scaling is not supported), got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if self.init_weights not in INITS:
            raise ValueError(f"{OWNER}: argument 'init_weights': expected one of {list(INITS)}, "
                             f"got {self.init_weights!r}")
        self._check_reduction_factor()
        leave_out = self.leave_out
        if isinstance(leave_out, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in leave_out):
            raise ValueError(f"{OWNER}: argument 'leave_out': expected a list of layer indices >= 0, "
                             f"got {leave_out!r}")
        self.leave_out = tuple(sorted(set(leave_out)))

    def _check_reduction_factor(self) -> None:
        factor = self.reduction_factor
        values = list(factor.values()) if isinstance(factor, Mapping) and factor else [factor]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{OWNER}: argument 'reduction_factor': expected a number > 0 or a mapping "
                                 f"{{'<layer>': factor, 'default': factor}}, got {factor!r}")
        if isinstance(factor, Mapping):
            self.reduction_factor = {str(k): v for k, v in factor.items()}

    @property
    def activation(self) -> str:
        """The activation as pypeft's op names it."""
        return ACTIVATIONS[self.non_linearity]

    def bottleneck_size(self, layer: int, hidden: int) -> int:
        """m for `layer`: int(hidden // reduction_factor), at least 1 (as the adapters library)."""
        factor = self.reduction_factor
        if isinstance(factor, Mapping):
            if str(layer) in factor:
                factor = factor[str(layer)]
            elif "default" in factor:
                factor = factor["default"]
            else:
                raise ValueError(f"{OWNER}: argument 'reduction_factor': no factor for layer {layer} and no "
                                 "'default' in the mapping")
        return max(1, int(hidden // factor))

    def math_fields(self) -> dict:
        """The fields that change what the adapter computes (saved, compared on load)."""
        skip = {"preset", "modules_to_save", "adapter_name", "method", "init_weights"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
