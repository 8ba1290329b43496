"""NF4 storage ops against bitsandbytes (the format's owner; its CPU quantisers
are the oracle): codes, absmax, the nested (double-quantised) absmax and its
code map equal bitsandbytes' bit for bit, and dequantisation equals theirs.
The linear op over NF4 runs the op contract in tests/op_table_nf4.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.library import opcheck

import pypeft.ops as P
import reference as R
from conftest import DEVICES

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (the NF4 oracle, a test dependency) "
                                "is not installed")


def weights(shape, dtype=torch.float32, seed=0):
    """Normal weights with blocks of very different scales, an all-zero stretch,
    and values exactly on NF4's bucket boundaries (scaled by their block's max)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w *= torch.logspace(-3, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    if n >= 200:
        w[64:128] = 0.0                      # a zero block (blocksize 64)
        table = R.nf4_table(torch.float32)
        mids = (table[:-1] + table[1:]) / 2  # bucket boundaries, in a block whose max is 1
        w[128:128 + 15] = mids.double()
        w[143] = 1.0
    return w.reshape(shape).to(dtype)


def bnb_quantize(w, blocksize, nested=False):
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    return packed, state


SHAPES = [(64, 64), (33, 100), (7,), (1,), (5, 3, 64), (1000, 130)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 32, 128, 4096])
def test_quantize_is_bitsandbytes(shape, dtype, blocksize):
    w = weights(shape, dtype)
    codes, absmax = P.nf4_quantize(w, blocksize)
    packed, state = bnb_quantize(w, blocksize)
    assert codes.dtype == torch.uint8 and codes.dim() == 1
    assert torch.equal(codes, packed.reshape(-1))
    assert absmax.dtype == torch.float32
    assert torch.equal(absmax, state.absmax)


def test_quantize_float64_is_bitsandbytes_of_its_float32():
    # bitsandbytes takes no float64; it would quantise the float32 rounding, as pypeft does.
    w = weights((40, 64), torch.float64, seed=3)
    codes, absmax = P.nf4_quantize(w)
    packed, state = bnb_quantize(w.float(), 64)
    assert torch.equal(codes, packed.reshape(-1)) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_is_bitsandbytes(shape, dtype):
    w = weights(shape, dtype, seed=1)
    packed, state = bnb_quantize(w, 64)
    ours = P.nf4_dequantize(packed.reshape(-1), state.absmax, 64, shape, dtype)
    theirs = bnb_f.dequantize_4bit(packed, state)
    assert ours.dtype == dtype == theirs.dtype and ours.shape == torch.Size(shape)
    assert torch.equal(ours, theirs.reshape(shape))
    assert torch.equal(ours, R.nf4_dequantize(packed, state.absmax, 64, shape, dtype))


def test_reference_table_is_bitsandbytes():
    assert torch.equal(R.nf4_table(), bnb_f.get_4bit_type("nf4", device="cpu"))


def test_dynamic_code_map_is_bitsandbytes():
    assert torch.equal(P.dynamic_code_map(), bnb_f.create_dynamic_map(signed=True))


@pytest.mark.parametrize("blocksize", [256, 4096, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_8bit_is_bitsandbytes(blocksize, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3000, generator=g) * torch.logspace(-4, 1, 3000)).to(dtype)
    x[512:768] = 0.0
    code = P.dynamic_code_map()
    ours, absmax = P.quantize_blockwise_8bit(x, code, blocksize)
    theirs, state = bnb_f.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert torch.equal(ours, theirs) and torch.equal(absmax, state.absmax)
    back = P.dequantize_blockwise_8bit(ours, absmax, code, blocksize)
    assert torch.equal(back, bnb_f.dequantize_blockwise(theirs, absmax=state.absmax, code=code, blocksize=blocksize,
                                                        ).float())


@pytest.mark.parametrize("shape", [(256, 512), (33, 100), (3000, 64)], ids=str)
def test_double_quantization_is_bitsandbytes(shape):
    w = weights(shape, torch.bfloat16, seed=7)
    codes, absmax = P.nf4_quantize(w)
    nested_codes, nested_absmax, offset = P.nf4_double_quantize(absmax)
    packed, state = bnb_quantize(w, 64, nested=True)
    assert torch.equal(codes, packed.reshape(-1))
    assert state.nested
    assert torch.equal(nested_codes, state.absmax)             # bitsandbytes keeps the 8-bit codes as "absmax"
    assert torch.equal(nested_absmax, state.state2.absmax)
    assert torch.equal(offset, state.offset)
    assert torch.equal(P.dynamic_code_map(), state.state2.code)
    assert state.state2.blocksize == 256
    # Back to a float32 absmax, then to the weights, as bitsandbytes dequantises a nested state.
    ours = P.nf4_double_dequantize(nested_codes, nested_absmax, offset)
    theirs = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours, theirs)
    w_ours = P.nf4_dequantize(codes, ours, 64, shape, torch.bfloat16)
    w_theirs = bnb_f.dequantize_4bit(packed, state)
    assert torch.equal(w_ours, w_theirs)


def test_round_trip_error_is_within_half_a_bucket():
    w = weights((128, 256), seed=9)
    codes, absmax = P.nf4_quantize(w)
    back = P.nf4_dequantize(codes, absmax, 64, w.shape)
    table = R.nf4_table(torch.float32)
    widest = (table[1:] - table[:-1]).max() / 2
    scale = absmax.repeat_interleave(64).reshape(w.shape)
    assert ((back - w).abs() <= widest * scale + 1e-6).all()


def test_empty_and_odd_sizes():
    codes, absmax = P.nf4_quantize(torch.empty(0))
    assert codes.numel() == 0 and absmax.numel() == 0
    assert P.nf4_dequantize(codes, absmax, 64, (0, 5)).shape == (0, 5)
    w = torch.tensor([0.5, -1.0, 0.25])
    codes, absmax = P.nf4_quantize(w)
    packed, state = bnb_quantize(w, 64)
    assert torch.equal(codes, packed.reshape(-1)) and (codes[-1] & 15) == 7   # padding nibble: zero's code


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w = weights((33, 100), seed=2).to(device)
    opcheck(torch.ops.pypeft.nf4_quantize.default, (w, 64))
    codes, absmax = P.nf4_quantize(w)
    opcheck(torch.ops.pypeft.nf4_dequantize.default, (codes, absmax, 64, [33, 100], torch.bfloat16))
    code = P.dynamic_code_map(device)
    opcheck(torch.ops.pypeft.quantize_blockwise_8bit.default, (absmax, code, 256))
    c8, a8 = P.quantize_blockwise_8bit(absmax, code, 256)
    opcheck(torch.ops.pypeft.dequantize_blockwise_8bit.default, (c8, a8, code, 256))


def test_quantize_under_compile():
    w = weights((64, 64), seed=4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def round_trip(w):
        codes, absmax = P.nf4_quantize(w)
        return P.nf4_dequantize(codes, absmax, 64, w.shape, torch.float32)

    codes, absmax = P.nf4_quantize(w)
    assert torch.equal(round_trip(w), P.nf4_dequantize(codes, absmax, 64, w.shape))


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_and_device_agree(device):
    w = weights((130, 64), torch.bfloat16, seed=6)
    codes, absmax = P.nf4_quantize(w.to(device))
    c_cpu, a_cpu = P.nf4_quantize(w)
    assert torch.equal(codes.cpu(), c_cpu) and torch.equal(absmax.cpu(), a_cpu)
    assert torch.equal(P.nf4_dequantize(codes, absmax, 64, w.shape, torch.bfloat16).cpu(),
                       P.nf4_dequantize(c_cpu, a_cpu, 64, w.shape, torch.bfloat16))
    n1, n2, off = P.nf4_double_quantize(absmax)
    m1, m2, moff = P.nf4_double_quantize(a_cpu)
    assert torch.equal(n1.cpu(), m1) and torch.equal(n2.cpu(), m2) and torch.allclose(off.cpu(), moff)


BAD = [
    ("quantize int", lambda: P.nf4_quantize(torch.ones(4, dtype=torch.int64)), TypeError, "w", "Long"),
    ("quantize odd blocksize", lambda: P.nf4_quantize(torch.ones(4), 63), ValueError, "blocksize", "even"),
    ("dequantize codes dtype", lambda: P.nf4_dequantize(torch.ones(2), torch.ones(1), 64, (4,)), TypeError, "codes",
     "uint8"),
    ("dequantize codes count", lambda: P.nf4_dequantize(torch.ones(3, dtype=torch.uint8), torch.ones(1), 64, (4,)),
     ValueError, "codes", "2 bytes"),
    ("dequantize absmax count", lambda: P.nf4_dequantize(torch.ones(64, dtype=torch.uint8), torch.ones(1), 64, (128,)),
     ValueError, "absmax", "2 values"),
    ("dequantize absmax dtype", lambda: P.nf4_dequantize(torch.ones(2, dtype=torch.uint8), torch.ones(1).double(), 64,
                                                         (4,)), TypeError, "absmax", "float32"),
    ("dequantize dtype", lambda: P.nf4_dequantize(torch.ones(2, dtype=torch.uint8), torch.ones(1), 64, (4,),
                                                  torch.int32), TypeError, "dtype", "Int"),
    ("8-bit code map size", lambda: P.quantize_blockwise_8bit(torch.ones(4), torch.ones(16), 256), ValueError, "code",
     "256 values"),
    ("8-bit blocksize", lambda: P.quantize_blockwise_8bit(torch.ones(4), P.dynamic_code_map(), 0), ValueError,
     "blocksize", ">= 1"),
    ("double quantize dtype", lambda: P.nf4_double_quantize(torch.ones(4).double()), TypeError, "absmax", "float32"),
]


@pytest.mark.parametrize("name,call,error,arg,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, error, arg, words):
    with pytest.raises(error, match=rf"argument '{arg}'.*{words}"):
        call()
