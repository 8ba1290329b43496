"""The Python face of pypeft's native ops (torch.ops.pypeft.*).

Importing this package loads the compiled library once; each submodule adds
the fake (meta) kernel and the autograd formula of one op and a typed wrapper.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from pypeft import _C  # noqa: F401  (registers torch.ops.pypeft.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pypeft's native ops (pypeft._C) are not built. Install pypeft with "
        "`pip install --no-build-isolation .` after installing torch."
    ) from e

from pypeft.ops.counter_dropout import counter_dropout
from pypeft.ops.lora_linear import lora_linear
from pypeft.ops.mixed_linear import lora_linear_mixed, vera_linear_mixed
from pypeft.ops.nf4 import (
    dequantize_blockwise_8bit,
    dynamic_code_map,
    nf4_double_dequantize,
    nf4_double_quantize,
    nf4_dequantize,
    nf4_linear,
    nf4_quantize,
    quantize_blockwise_8bit,
)
from pypeft.ops.recurrent_cell import gru_cell, lstm_cell, rnn_cell
from pypeft.ops.recurrent_scan import recurrent_scan
from pypeft.ops.token_subset_activation import token_subset_activation, token_subset_gated_activation
from pypeft.ops.token_subset_attention import token_subset_attention
from pypeft.ops.token_subset_dropout import token_subset_dropout
from pypeft.ops.token_subset_linear import token_subset_linear, token_subset_lora_linear, token_subset_vera_linear
from pypeft.ops.token_subset_norm import token_subset_layer_norm, token_subset_rms_norm
from pypeft.ops.vera_linear import vera_linear
from pypeft.ops.bottleneck_adapter import bottleneck_adapter
from pypeft.ops.adapter_fusion import adapter_fusion

__all__ = [
    "counter_dropout",
    "gru_cell",
    "lora_linear",
    "lora_linear_mixed",
    "lstm_cell",
    "dequantize_blockwise_8bit",
    "dynamic_code_map",
    "nf4_double_dequantize",
    "nf4_double_quantize",
    "nf4_dequantize",
    "nf4_linear",
    "nf4_quantize",
    "quantize_blockwise_8bit",
    "recurrent_scan",
    "rnn_cell",
    "token_subset_activation",
    "token_subset_attention",
    "token_subset_dropout",
    "token_subset_gated_activation",
    "token_subset_layer_norm",
    "token_subset_linear",
    "token_subset_lora_linear",
    "token_subset_rms_norm",
    "token_subset_vera_linear",
    "vera_linear",
    "vera_linear_mixed",
    "bottleneck_adapter",
    "adapter_fusion",
]
