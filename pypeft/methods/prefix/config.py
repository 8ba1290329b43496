"""PrefixTuningConfig: what pypeft.patch(model, method="prefix_tuning", ...) takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from pypeft.methods.config_checks import check_common


def _check_positive_int(owner: str, argument: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: argument '{argument}': expected an int >= 1{' or None' if allow_none else ''}, "
                         f"got {value!r}")


@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang, 2021), with peft's math and file format.

    num_virtual_tokens: prefix length n; every layer's self-attention sees n
    trainable key/value slots before the real tokens (per key/value head, so
    grouped- and multi-query attention get prefixes of their KV heads' shape).
    prefix_projection: peft's reparameterisation ("P-tuning v2"): an
    embedding [n, token_dim] through Linear -> Tanh -> Linear to every
    layer's keys and values; encoder_hidden_size is the MLP's width (None:
    token_dim). modules_to_save: modules trained in full beside the prefix
    (default: a sequence classifier's head, as peft).
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    adapter_name: str = "default"
    modules_to_save: list[str] | None = field(default=None)

    method = "prefix_tuning"

    def __post_init__(self):
        owner = "PrefixTuningConfig"
        _check_positive_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        _check_positive_int(owner, "encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"{owner}: argument 'prefix_projection': expected a bool, got {self.prefix_projection!r}")
        check_common(owner, self)
