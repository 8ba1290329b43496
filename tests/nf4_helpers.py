"""bitsandbytes as the NF4 oracle on CPU: a Linear4bit quantised from given
weights, its dequantised weight, and model-level switches.

Two things bnb 0.50.2 does on this kind of CPU (AVX512) that the oracle avoids:
- its native CPU dequantize_4bit kernel misplaces absmax when a weight row's
  length is a multiple of 16 but not of the block size (rows of 96 with
  blocks of 64: elements scaled by a neighbouring block's absmax, round-trip
  errors 4x NF4's); its own pure-PyTorch kernel (the default backend's
  _dequantize_4bit_compute, what it runs where the native one is missing)
  and pypeft's agree with each other and with the format's definition. The
  dequantised weights here are bnb's codes and absmax decoded by that
  definition in plain PyTorch (tests/reference.py's nf4_dequantize, on bnb's
  NF4 table).
- on a CPU with AVX512-BF16, the first eval-mode no-grad forward of a
  Linear4bit repacks the layer for a bf16 kernel: absmax rounded to
  bfloat16 (a lossy change of the stored state, kept afterwards) and a
  bfloat16 GEMM; it asserts out_features % 32 == 0. Every Linear4bit an
  oracle runs gets `support_avx512bf16_for_cpu = False` first (matmul_4bit
  over dequantize_4bit), and models run through bnb's forward have widths
  that are multiples of 64, where its native dequantiser is right.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
except ImportError:  # the GPU image has none: the tests that need the oracle skip
    bnb = bnb_f = None

requires_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (the NF4 oracle, a test dependency) is not "
                                                       "installed")


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
    """W [out, in] of a Linear4bit (or of its Params4bit), decoded by bnb's
    reference kernel (module docstring)."""
    import reference
    weight = layer if isinstance(layer, bnb.nn.Params4bit) else layer.weight
    state = weight.quant_state
    assert state.quant_type == "nf4"
    absmax = state.absmax
    if state.nested:
        absmax = (bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return reference.nf4_dequantize(weight.data, absmax, state.blocksize, state.shape, state.dtype)


class _Dequantized(nn.Module):
    """What a Linear4bit computes (bnb's reference path), over a plain weight:
    x cast to the compute dtype, x W^T + b there, the result in x's dtype."""

    def __init__(self, weight, bias, compute_dtype):
        super().__init__()
        self.weight, self.bias, self.compute_dtype = weight, bias, compute_dtype

    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def dequantized_model(model: nn.Module) -> nn.Module:
    """A copy of a transformers + bitsandbytes model with each Linear4bit replaced by
    an nn.Linear holding its dequantised weight: the reference forward."""
    import copy
    out = copy.deepcopy(model)
    for name, layer in bnb_layers(out).items():
        bias = None if layer.bias is None else layer.bias.detach().clone()
        out.set_submodule(name, _Dequantized(bnb_dequantized(layer), bias, layer.compute_dtype))
    return out


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
