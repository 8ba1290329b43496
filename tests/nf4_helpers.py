"""bitsandbytes as the NF4 oracle on CPU: a Linear4bit quantised from given
weights, its dequantised weight, and model-level switches.

bnb 0.50 on a CPU with AVX512-BF16, at the first eval-mode no-grad forward
of a Linear4bit, repacks the layer for its CPU kernel: absmax rounded to
bfloat16 (a lossy change of the stored state, kept afterwards, and a
bfloat16 GEMM). Every Linear4bit an oracle runs gets
`support_avx512bf16_for_cpu = False` first, so bnb runs its reference path:
matmul_4bit over dequantize_4bit, which equals F.linear(x, dequantize_4bit(W), b).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the NF4 oracle, a test dependency) is not installed")
import bitsandbytes.functional as bnb_f  # noqa: E402


def bnb_linear4bit(linear: nn.Linear, double_quant: bool = True, blocksize: int = 64,
                   quant_type: str = "nf4") -> "bnb.nn.Linear4bit":
    """bnb's Linear4bit holding `linear`'s weights, quantised on the CPU (a
    Params4bit not yet quantised quantises on its first .to(device))."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, compress_statistics=double_quant,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


def bnb_dequantized(layer) -> torch.Tensor:
    return bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def bnb_reference_path(model: nn.Module) -> nn.Module:
    """Make every Linear4bit of a model run bnb's reference path (module docstring)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def state_dict_differences(a: dict, b: dict) -> list[str]:
    """Keys whose presence, dtype, shape or bytes differ between two state_dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            out.append(f"{k}: only in {'first' if k in a else 'second'}")
        elif a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k].cpu(), b[k].cpu()):
            out.append(f"{k}: {a[k].dtype}{list(a[k].shape)} vs {b[k].dtype}{list(b[k].shape)}")
    return out


def bnb_config(double_quant: bool = True, compute_dtype=torch.float32, **kw):
    import transformers
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kw.pop("quant_type", "nf4"),
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=compute_dtype, **kw)
