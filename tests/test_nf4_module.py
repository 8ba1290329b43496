"""NF4Linear against bitsandbytes' Linear4bit (the oracle): codes, absmax and
nested statistics, the state_dict layout, forward, dequantised weights;
moving, copying, loading; bad arguments."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nf4_helpers import bnb_dequantized, bnb_linear4bit, requires_bnb, state_dict_differences
from pypeft.quant import NF4Linear


def _linear(in_features=64, out_features=96, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def _tol(dtype):
    return dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


CASES = [  # (in, out, bias, dtype, double_quant, blocksize)
    (64, 96, True, torch.float32, True, 64),
    (64, 96, False, torch.float32, False, 64),
    (128, 40, True, torch.bfloat16, True, 64),
    (96, 33, True, torch.float32, True, 128),   # blocks straddle rows; out not a multiple of anything
    (256, 300, True, torch.float32, True, 32),  # > 256 blocks: two nested blocks
    (64, 64, True, torch.bfloat16, False, 256),
]


@requires_bnb
@pytest.mark.parametrize("in_features,out_features,bias,dtype,double_quant,blocksize", CASES)
def test_state_dict_is_bnb_linear4bit(in_features, out_features, bias, dtype, double_quant, blocksize):
    linear = _linear(in_features, out_features, bias, dtype)
    ours = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
    theirs = bnb_linear4bit(linear, double_quant, blocksize)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # same keys, same order
    assert state_dict_differences(a, b) == []


@requires_bnb
@pytest.mark.parametrize("in_features,out_features,bias,dtype,double_quant,blocksize", CASES)
def test_forward_and_dequantized_weight_match_bnb(in_features, out_features, bias, dtype, double_quant, blocksize):
    linear = _linear(in_features, out_features, bias, dtype)
    ours = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
    theirs = bnb_linear4bit(linear, double_quant, blocksize)
    w = bnb_dequantized(theirs)
    assert torch.equal(ours.dequantized_weight(), w)
    assert ours.dequantized_weight().dtype == dtype
    x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = ours(x)
    assert y.dtype == dtype and y.shape == (2, 5, out_features)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), **_tol(dtype))


@requires_bnb
def test_conv1d_is_stored_transposed_as_bnb_via_transformers():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(96, 64)  # nx=64 in, nf=96 out; weight [64, 96]
    nn.init.normal_(conv.bias)
    ours = NF4Linear.from_linear(conv)
    assert (ours.in_features, ours.out_features, ours.from_conv1d) == (64, 96, True)
    # transformers' bnb path quantises Conv1D weights transposed (Bnb4bitQuantize).
    ref = nn.Linear(64, 96)
    ref.weight.data, ref.bias.data = conv.weight.detach().t().contiguous(), conv.bias.detach().clone()
    theirs = bnb_linear4bit(ref)
    assert state_dict_differences(ours.state_dict(), theirs.state_dict()) == []
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), conv(x), rtol=0, atol=0.25)  # 4-bit weights: close, not equal
    torch.testing.assert_close(ours(x), F.linear(x, bnb_dequantized(theirs), conv.bias))
    # a full-precision Conv1D weight ([in, out]) loads into it, quantised
    shell = NF4Linear(64, 96, from_conv1d=True)
    shell.load_state_dict(conv.state_dict())
    assert state_dict_differences(shell.state_dict(), ours.state_dict()) == []


@requires_bnb
@pytest.mark.parametrize("double_quant", [True, False])
def test_loads_bnb_state_dict_and_round_trips(double_quant):
    linear = _linear()
    theirs = bnb_linear4bit(linear, double_quant)
    # a shell of the other kind takes the checkpoint's layout
    shell = NF4Linear(64, 96, double_quant=not double_quant, blocksize=128)
    shell.load_state_dict(theirs.state_dict())
    assert shell.double_quant == double_quant and shell.blocksize == 64
    assert torch.equal(shell.dequantized_weight(), bnb_dequantized(theirs))
    buffer = io.BytesIO()
    torch.save(shell.state_dict(), buffer)
    buffer.seek(0)
    again = NF4Linear(64, 96)
    again.load_state_dict(torch.load(buffer))
    assert state_dict_differences(again.state_dict(), theirs.state_dict()) == []
    # and bnb loads ours (transformers' deserialiser: Params4bit.from_prequantized)
    import bitsandbytes as bnb
    sd = again.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb_dequantized(p), again.dequantized_weight())


def test_full_precision_state_dict_is_quantised_on_load():
    linear = _linear()
    shell = NF4Linear(64, 96)
    shell.load_state_dict(linear.state_dict())
    assert state_dict_differences(shell.state_dict(), NF4Linear.from_linear(linear).state_dict()) == []
    with torch.device("meta"):
        meta_shell = NF4Linear(64, 96)
    meta_shell.load_state_dict(linear.state_dict())
    assert meta_shell.weight.device.type == "cpu"
    assert state_dict_differences(meta_shell.state_dict(), shell.state_dict()) == []


def test_to_dtype_keeps_codes_and_statistics_and_compute_dtype():
    linear = _linear()
    layer = NF4Linear.from_linear(linear)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    w = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert layer.nested_offset.dtype == torch.float32 and layer.nested_offset.dim() == 0
    assert layer.bias.dtype == torch.bfloat16 and layer.compute_dtype == torch.float32
    after = layer.state_dict()
    assert state_dict_differences({k: v for k, v in after.items() if k != "bias"},
                                  {k: v for k, v in before.items() if k != "bias"}) == []
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(4, 64)
    y = layer(x.bfloat16())  # computed in float32 (compute_dtype), returned in x's dtype, as bnb
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.bfloat16().float(), w, linear.bias.bfloat16().float()).bfloat16())
    single = NF4Linear.from_linear(linear, double_quant=False).half()
    assert single.absmax.dtype == torch.float32 and single.bias.dtype == torch.float16


def test_deepcopy_pickle_and_meta():
    layer = NF4Linear.from_linear(_linear())
    clone = copy.deepcopy(layer)
    assert clone.weight.data_ptr() != layer.weight.data_ptr()
    assert state_dict_differences(clone.state_dict(), layer.state_dict()) == []
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert state_dict_differences(loaded.state_dict(), layer.state_dict()) == []
    meta = copy.deepcopy(layer).to("meta")
    assert meta.weight.is_meta and meta.nested_absmax.is_meta and meta.nested_absmax.dtype == torch.float32


def test_grads_reach_input_and_a_trained_bias_not_the_codes():
    linear = _linear()
    layer = NF4Linear.from_linear(linear)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad  # frozen by default
    layer.bias.requires_grad_(True)  # BitFit trains it
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 96)
    (layer(x) * g).sum().backward()
    w = layer.dequantized_weight()
    torch.testing.assert_close(x.grad, g @ w)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_extra_repr_and_attributes():
    layer = NF4Linear.from_linear(_linear(bias=False), blocksize=128, double_quant=False,
                                  compute_dtype=torch.bfloat16)
    assert (layer.in_features, layer.out_features, layer.blocksize, layer.compute_dtype) == (64, 96, 128,
                                                                                              torch.bfloat16)
    assert "in_features=64, out_features=96, bias=False, blocksize=128, double_quant=False" in repr(layer)
    assert layer.weight.shape == (96, 32) and layer.weight.dtype == torch.uint8
    assert layer.absmax.shape == (96 * 64 // 128,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="argument 'in_features': expected an even number.*got 33"):
        NF4Linear(33, 8)
    with pytest.raises(ValueError, match="argument 'linear': expected an even in_features.*got 33"):
        NF4Linear.from_linear(nn.Linear(33, 8))
    with pytest.raises(ValueError, match=r"argument 'blocksize': expected one of \(32, 64.*got 100"):
        NF4Linear.from_linear(nn.Linear(64, 8), blocksize=100)
    with pytest.raises(TypeError, match="argument 'compute_dtype'.*got torch.int32"):
        NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.int32)
    with pytest.raises(TypeError, match="argument 'linear': expected torch.nn.Linear.*got Conv2d"):
        NF4Linear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="meta device"):
        NF4Linear.from_linear(nn.Linear(64, 8, device="meta"))
    with pytest.raises(ValueError, match=r"argument 'w': expected shape \[8, 64\], got \[8, 32\]"):
        NF4Linear(64, 8).quantize_(torch.randn(8, 32))


@requires_bnb
def test_load_rejects_fp4_wrong_shapes_and_foreign_maps():
    linear = _linear()
    fp4 = bnb_linear4bit(linear, quant_type="fp4").state_dict()
    with pytest.raises(RuntimeError, match=r"quant_type: expected 'nf4'.*FP4 is not supported.*got 'fp4'"):
        NF4Linear(64, 96).load_state_dict(fp4)
    good = bnb_linear4bit(linear).state_dict()
    with pytest.raises(RuntimeError, match=r"shape \[out, in\]: expected \[96, 32\], got \[96, 64\]"):
        NF4Linear(32, 96).load_state_dict(good)
    with pytest.raises(RuntimeError, match=r"expected a weight of shape \[96, 64\], got \[64, 96\]"):
        NF4Linear(64, 96).load_state_dict({"weight": linear.weight.t(), "bias": linear.bias})
    other_map = dict(good)
    other_map["weight.quant_map"] = other_map["weight.quant_map"].flip(0)
    with pytest.raises(RuntimeError, match="quant_map: expected bitsandbytes' NF4 table"):
        NF4Linear(64, 96).load_state_dict(other_map)
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        NF4Linear(64, 96).load_state_dict({k: v for k, v in good.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        NF4Linear(64, 96).load_state_dict({**good, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="expected NF4 codes with their quant state"):
        NF4Linear(64, 96).load_state_dict({"weight": good["weight"], "bias": good["bias"]})
