"""FusionConfig: what pypeft.patch(model, method="fusion", adapters=[...]) takes.

The presets are the `adapters` library's AdapterFusion configs:
"dynamic" (query, key and a value matrix started at the identity; the
paper's) and "static" (no value matrix). Fields left None take the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

from pypeft.methods.config_checks import check_common

OWNER = "pypeft.patch(method='fusion')"

PRESETS = {
    "dynamic": dict(value=True, value_initialized=True, regularization=True),
    "static": dict(value=False, value_initialized=False, regularization=False),
}


@dataclass
class FusionConfig:
    """Options of pypeft.patch(model, method="fusion", adapters=[...]).

    adapters: the names of two or more bottleneck adapters of the model to
        fuse (AdapterFusion stage 2: they and the backbone stay frozen; the
        fusion layers and the head train).
    preset: "dynamic" (default) or "static".
    value: a value matrix [d, d] (no bias) over the adapters' outputs;
        value_initialized: it starts near the identity (else N(0, 0.02)).
    query_before_ln: the query reads the sublayer's output h, not what the
        adapters read (norm(h + x) for Pfeiffer adapters).
    temperature: the softmax temperature starts at 50 and falls by 0.05 per
        forward down to 1 (the library's schedule); else 1.
    dropout_prob: dropout on the attention scores; None: the model config's
        attention_probs_dropout_prob (0 if it has none), as the library.
    regularization: recorded for pypeft.methods.fusion.regularization_loss
        (0.01 · ||I − V||², the library's term, to add to the loss).
    modules_to_save: trained in full beside it (default: a sequence
        classifier's head).
    """

    adapters: Sequence[str] = ()
    preset: str = "dynamic"
    value: bool | None = None
    value_initialized: bool | None = None
    regularization: bool | None = None
    query_before_ln: bool = False
    temperature: bool = False
    dropout_prob: float | None = None
    modules_to_save: list[str] | None = None
    adapter_name: str = "fusion"
    method: str = field(default="fusion", init=False)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"{OWNER}: argument 'preset': expected one of {sorted(PRESETS)}, got {self.preset!r}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_common(OWNER, self)
        adapters = self.adapters
        if isinstance(adapters, str) or not all(isinstance(a, str) and a for a in adapters) or len(adapters) < 2:
            raise ValueError(f"{OWNER}: argument 'adapters': expected the names of two or more bottleneck adapters, "
                             f"got {adapters!r}")
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"{OWNER}: argument 'adapters': {list(adapters)} names an adapter twice")
        self.adapters = tuple(adapters)
        for key in ("value", "value_initialized", "regularization", "query_before_ln", "temperature"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{OWNER}: argument '{key}': expected a bool, got {getattr(self, key)!r}")
        p = self.dropout_prob
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0):
            raise ValueError(f"{OWNER}: argument 'dropout_prob': expected None or a probability in [0, 1), got {p!r}")

    def math_fields(self) -> dict:
        skip = {"preset", "modules_to_save", "adapter_name", "method", "value_initialized", "regularization"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
