"""NF4 (QLoRA's 4-bit NormalFloat) storage and the linear layer over it.

    codes, absmax = nf4_quantize(w, blocksize=64)          # bit-exact with bitsandbytes
    w_hat = nf4_dequantize(codes, absmax, 64, w.shape, dtype=torch.bfloat16)
    nested_codes, nested_absmax, offset = nf4_double_quantize(absmax)   # QLoRA's double quantisation
    absmax = nf4_double_dequantize(nested_codes, nested_absmax, offset)
    y = nf4_linear(x, codes.view(out, in_ // 2), absmax, 64, bias)      # x deq(W)ᵀ + b

The layout is bitsandbytes': codes are uint8, two per byte in w's flattened
order, the first in the high nibble; absmax is float32, one per block of
`blocksize` values; double quantisation stores absmax - mean(absmax) in 8 bits
blockwise (blocks of 256) on bitsandbytes' dynamic code map (`dynamic_code_map`).
Codes, absmax and the nested state equal bitsandbytes' CPU output for the same
weights (tests/test_nf4_ops.py); dequantisation is table[code] * absmax in
float32, then a cast, as theirs.

nf4_linear saves nothing for backward but the frozen weight's codes and absmax:
grad_x runs through the dequantised weight tile by tile of its rows, and no
full-precision copy of W exists at any time. dtypes: x and bias share one
dtype (float32, float64, bfloat16; float16 on CUDA) in which W is dequantised
and the product runs; quantisation accepts float16 on the CPU too.
"""

from __future__ import annotations

import functools

import torch

from pypeft.ops import _checks
from pypeft.ops._double_backward import forbid_double_backward

_quantize_op = torch.ops.pypeft.nf4_quantize.default
_dequantize_op = torch.ops.pypeft.nf4_dequantize.default
_quantize_8bit_op = torch.ops.pypeft.quantize_blockwise_8bit.default
_dequantize_8bit_op = torch.ops.pypeft.dequantize_blockwise_8bit.default
_linear_op = torch.ops.pypeft.nf4_linear.default
_linear_backward_op = torch.ops.pypeft.nf4_linear_backward.default

_QUANTIZE, _DEQUANTIZE = "pypeft.nf4_quantize", "pypeft.nf4_dequantize"
_QUANTIZE_8BIT, _DEQUANTIZE_8BIT = "pypeft.quantize_blockwise_8bit", "pypeft.dequantize_blockwise_8bit"
_LINEAR, _LINEAR_BACKWARD = "pypeft.nf4_linear", "pypeft.nf4_linear_backward"

_STORED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: QLoRA's block sizes: 64 values per absmax, 256 absmax values per nested absmax.
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def nf4_quantize(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise w (any shape) to NF4: (codes uint8 [ceil(numel / 2)], absmax float32 [ceil(numel / blocksize)]).

    Not differentiable (quantisation is a storage step): w is read detached.
    """
    return _quantize_op(w.detach(), blocksize)


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of `shape` that (codes, absmax) hold, in `dtype`."""
    return _dequantize_op(codes, absmax, blocksize, list(shape), dtype)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantisation on a 256-value code map: (codes uint8 of x's shape, absmax float32)."""
    return _quantize_8bit_op(x.detach(), code, blocksize)


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int) -> torch.Tensor:
    """code[codes] * absmax[block], float32."""
    return _dequantize_8bit_op(codes, absmax, code, blocksize)


def _build_dynamic_code_map() -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7,
    # total_bits=8), computed with the same float32 steps so that it is the
    # same 256 values: per exponent i, the midpoints of an even split of
    # [0.1, 1] scaled by 10^(i - 6), both signs; then 0 and 1; sorted.
    values: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        values += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


# Built once at import, not on first use: the first use may be inside a
# torch.compile trace (an NF4 model's forward), where building it (.tolist()
# of a float tensor) broke the graph at every NF4 layer (seen under
# Trainer(torch_compile=True)); a traced forward reads this as a constant.
_CODE_MAP = _build_dynamic_code_map()


@functools.lru_cache(maxsize=None)
def _dynamic_code_map(device: torch.device) -> torch.Tensor:
    return _CODE_MAP if device.type == "cpu" else _CODE_MAP.to(device)


def dynamic_code_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code map (float32 [256], sorted): the
    nested quantisation map of QLoRA's double quantisation. A fresh copy."""
    return _dynamic_code_map(torch.device(device or "cpu")).clone()


def nf4_double_quantize(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantisation of NF4's absmax: (nested_codes uint8 [n],
    nested_absmax float32 [ceil(n / blocksize)], offset float32 0-dim), where
    offset = absmax.mean() and the codes quantise absmax - offset on
    dynamic_code_map() (bitsandbytes' quantize_4bit(compress_statistics=True))."""
    _checks.check_defined("pypeft.nf4_double_quantize", "absmax", absmax)
    _checks.check_type(absmax.dtype == torch.float32, "pypeft.nf4_double_quantize", "absmax",
                       "a float32 tensor", _checks.dtype_name(absmax.dtype))
    absmax = absmax.detach()
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, _dynamic_code_map(absmax.device), blocksize)
    return codes, nested_absmax, offset


def nf4_double_dequantize(nested_codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                          blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """NF4's absmax (float32) back from its double quantisation."""
    return dequantize_blockwise_8bit(nested_codes, nested_absmax, _dynamic_code_map(nested_codes.device),
                                     blocksize) + offset


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, blocksize: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ deq(weight).T + bias.

    Args:
        x: [..., in] activations (the compute dtype).
        weight: uint8 NF4 codes [out, in // 2] (nf4_quantize's codes of an
            [out, in] weight, viewed as rows).
        absmax: float32 [ceil(out * in / blocksize)].
        blocksize: values per absmax (even).
        bias: [out] in x's dtype, or None.
    Returns:
        y: [..., out] in x's dtype.
    """
    return _linear_op(x, weight, absmax, blocksize, bias)


# --- fake kernels (shapes, dtypes, devices; the checks of csrc/include/pypeft/nf4_args.h,
# the shared ones in _checks.py) ---

_ceil_div = _checks.ceil_div
_check_nf4_blocksize = _checks.check_nf4_blocksize
_check_absmax = _checks.check_absmax


def _check_quantize_input(op: str, arg: str, t) -> None:
    _checks.check_defined(op, arg, t)
    _checks.check_dtype_in(op, arg, t, _STORED)


def _check_codes(op: str, arg: str, codes, count, what: str) -> None:
    _checks.check_defined(op, arg, codes)
    _checks.check_type(codes.dtype == torch.uint8, op, arg, "a uint8 tensor", _checks.dtype_name(codes.dtype))
    _checks.check_value(codes.numel() == count, op, arg, f"{count} bytes ({what})",
                        f"shape {_checks.shape_str(codes.shape)}")


def _check_code_map(op: str, code, ref_arg: str, ref) -> None:
    _checks.check_defined(op, "code", code)
    _checks.check_type(code.dtype == torch.float32, op, "code", "a float32 tensor", _checks.dtype_name(code.dtype))
    _checks.check_value(code.numel() == 256, op, "code", "256 values (an 8-bit code map)",
                        f"shape {_checks.shape_str(code.shape)}")
    _checks.check_same_device(op, "code", code, ref_arg, ref)


@torch.library.register_fake("pypeft::nf4_quantize")
def _nf4_quantize_fake(w, blocksize):
    _check_quantize_input(_QUANTIZE, "w", w)
    _check_nf4_blocksize(_QUANTIZE, blocksize)
    n = w.numel()
    return w.new_empty((_ceil_div(n, 2),), dtype=torch.uint8), w.new_empty((_ceil_div(n, blocksize),),
                                                                           dtype=torch.float32)


@torch.library.register_fake("pypeft::nf4_dequantize")
def _nf4_dequantize_fake(codes, absmax, blocksize, shape, dtype):
    _check_nf4_blocksize(_DEQUANTIZE, blocksize)
    for s in shape:
        _checks.check_value(s >= 0, _DEQUANTIZE, "shape", "non-negative sizes", _checks.shape_str(shape))
    n = _checks.numel(shape)
    _check_codes(_DEQUANTIZE, "codes", codes, _ceil_div(n, 2), "two 4-bit codes per byte of the shape's values")
    _check_absmax(_DEQUANTIZE, absmax, _ceil_div(n, blocksize), "codes", codes)
    _checks.check_type(dtype in _STORED, _DEQUANTIZE, "dtype", "one of float32, float64, bfloat16, float16",
                       _checks.dtype_name(dtype))
    return codes.new_empty(shape, dtype=dtype)


@torch.library.register_fake("pypeft::quantize_blockwise_8bit")
def _quantize_8bit_fake(x, code, blocksize):
    _check_quantize_input(_QUANTIZE_8BIT, "x", x)
    _check_code_map(_QUANTIZE_8BIT, code, "x", x)
    _checks.check_value(blocksize >= 1, _QUANTIZE_8BIT, "blocksize",
                        "a block size >= 1 (double quantisation uses 256)", blocksize)
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((_ceil_div(x.numel(), blocksize),),
                                                                dtype=torch.float32)


@torch.library.register_fake("pypeft::dequantize_blockwise_8bit")
def _dequantize_8bit_fake(codes, absmax, code, blocksize):
    _check_codes(_DEQUANTIZE_8BIT, "codes", codes, codes.numel(), "8-bit codes")
    _checks.check_value(blocksize >= 1, _DEQUANTIZE_8BIT, "blocksize",
                        "a block size >= 1 (double quantisation uses 256)", blocksize)
    _check_absmax(_DEQUANTIZE_8BIT, absmax, _ceil_div(codes.numel(), blocksize), "codes", codes)
    _check_code_map(_DEQUANTIZE_8BIT, code, "codes", codes)
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.register_fake("pypeft::nf4_linear")
def _nf4_linear_fake(x, weight, absmax, blocksize, bias):
    _checks.check_defined(_LINEAR, "x", x)
    _checks.check_value(x.dim() >= 1, _LINEAR, "x", "a tensor of shape [..., in_features]", "a 0-D tensor")
    _checks.check_activation_dtype(_LINEAR, "x", x)
    out, _ = _checks.check_nf4_weight(_LINEAR, weight, absmax, blocksize, x)
    if bias is not None:
        _checks.check_dim(_LINEAR, "bias", bias, 1)
        _checks.check_size(_LINEAR, "bias", bias, 0, out, "out_features, from weight [out, in / 2]")
        _checks.check_like(_LINEAR, "bias", bias, "x", x)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake("pypeft::nf4_linear_backward")
def _nf4_linear_backward_fake(grad_y, weight, absmax, blocksize, output_mask):
    _checks.check_defined(_LINEAR_BACKWARD, "grad_y", grad_y)
    _checks.check_activation_dtype(_LINEAR_BACKWARD, "grad_y", grad_y)
    _checks.check_dim(_LINEAR_BACKWARD, "weight", weight, 2)
    _checks.check_value(grad_y.dim() >= 1 and grad_y.shape[-1] == weight.shape[0], _LINEAR_BACKWARD, "grad_y",
                        f"last dim {weight.shape[0]} (out_features, from weight)",
                        f"shape {_checks.shape_str(grad_y.shape)}")
    x_like = grad_y.new_empty((0, weight.shape[1] * 2))
    out, n_in = _checks.check_nf4_weight(_LINEAR_BACKWARD, weight, absmax, blocksize, x_like, "grad_y")
    need_x, need_bias = output_mask
    return (grad_y.new_empty((*grad_y.shape[:-1], n_in)) if need_x else None,
            grad_y.new_empty((out,)) if need_bias else None)


# --- autograd: grad_x through the dequantised weight, grad_bias; W is frozen ---

def _setup_context(ctx, inputs, output):
    _, weight, absmax, blocksize, _ = inputs
    ctx.save_for_backward(weight, absmax)
    ctx.blocksize = blocksize


def _backward(ctx, grad_y):
    weight, absmax = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_bias = _linear_backward_op(grad_y, weight, absmax, ctx.blocksize, [need[0], need[4]])
    return grad_x, None, None, None, grad_bias


torch.library.register_autograd("pypeft::nf4_linear", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::nf4_linear_backward", "pypeft.nf4_linear")
