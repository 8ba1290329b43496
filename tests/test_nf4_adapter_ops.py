"""The adapter ops over an NF4 base weight (QLoRA): what is particular to that
form. (The op contract over NF4 samples of every op — opcheck, the reference,
gradcheck, compile, TorchScript, saved bytes, bad input — runs from
tests/op_table_nf4.py in test_op_contract.py.) Here: a weight quantised by
nf4_quantize itself, bfloat16 activations (the tiles' float32 sum in
backward), the frozen absmax refused, and base rows equal to nf4_linear's."""

import pytest
import torch

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft import ops as P

N_OUT, N_IN, R_ = 24, 32, 4


def nf4_layer(device="cpu", blocksize=64, seed=0):
    """A weight quantised by pypeft.ops.nf4_quantize (codes viewed as rows), and its bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N_OUT, N_IN, generator=g)
    codes, absmax = P.nf4_quantize(w, blocksize)
    return codes.view(N_OUT, N_IN // 2).to(device), absmax.to(device), torch.randn(N_OUT, generator=g).to(device)


def dequantised(codes, absmax, blocksize, dtype):
    return R.nf4_dequantize(codes, absmax, blocksize, (codes.shape[0], 2 * codes.shape[1]), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_over_quantised_weight_matches_reference(device):
    codes, absmax, bias = nf4_layer(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, N_IN, generator=g, dtype=torch.float64).to(device).requires_grad_()
    a = torch.randn(R_, N_IN, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(N_OUT, R_, generator=g, dtype=torch.float64).to(device).requires_grad_()
    seed = torch.tensor(5)
    y = P.lora_linear(x, codes, bias.double(), a, b, 0.5, 0.2, seed, weight_absmax=absmax, weight_blocksize=64)
    ref_in = [t.detach().cpu().requires_grad_() for t in (x, a, b)]
    w = dequantised(codes, absmax, 64, torch.float64).cpu()
    y_ref = R.lora_linear(ref_in[0], w, bias.double().cpu(), ref_in[1], ref_in[2], 0.5, 0.2, 5)
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-10, rtol=1e-9)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(y, (x, a, b), gy.to(device)), torch.autograd.grad(y_ref, ref_in, gy)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_activations_over_nf4(device):
    """x, bias in bfloat16, fp32 adapter: close to the float64 reference with the
    weight dequantised in bfloat16 (what the op multiplies), grad_x included
    (its frozen part summed over W's tiles in float32)."""
    codes, absmax, bias = nf4_layer(device, blocksize=32, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, N_IN, generator=g).to(device, torch.bfloat16).requires_grad_()
    a = (0.3 * torch.randn(R_, N_IN, generator=g)).to(device).requires_grad_()
    b = (0.3 * torch.randn(N_OUT, R_, generator=g)).to(device).requires_grad_()
    y = P.lora_linear(x, codes, bias.bfloat16(), a, b, 2.0, weight_absmax=absmax, weight_blocksize=32)
    assert y.dtype == torch.bfloat16
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (x, a, b)]
    w = dequantised(codes, absmax, 32, torch.bfloat16).double().cpu()
    y_ref = R.lora_linear(ref_in[0], w, bias.bfloat16().double().cpu(), ref_in[1], ref_in[2], 2.0)
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=0.1, rtol=0.02)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, a, b), gy.to(device, torch.bfloat16))
    want = torch.autograd.grad(y_ref, ref_in, gy)
    for name, gg, ww in zip(("x", "lora_a", "lora_b"), got, want):
        torch.testing.assert_close(gg.double().cpu(), ww, atol=0.15, rtol=0.03, msg=lambda m: f"grad {name}: {m}")


def _calls(codes, absmax, bias, x):
    """Each training op over the NF4 base, as a function of (x, weight_absmax)."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(R_, N_IN, generator=g), torch.randn(N_OUT, R_, generator=g)
    va, vb = torch.randn(R_, N_IN + 2, generator=g), torch.randn(N_OUT + 1, R_, generator=g)
    ld, lb = torch.randn(R_, generator=g), torch.randn(N_OUT, generator=g)
    pos = torch.tensor([[0, 2], [1, 3]])
    nf4 = lambda m: dict(weight_absmax=m, weight_blocksize=64)  # noqa: E731
    return {
        "lora_linear": lambda m: P.lora_linear(x, codes, bias, a, b, 1.0, **nf4(m)),
        "vera_linear": lambda m: P.vera_linear(x, codes, bias, va, vb, ld, lb, **nf4(m)),
        "token_subset_linear": lambda m: P.token_subset_linear(x, codes, bias, pos, **nf4(m)),
        "token_subset_lora_linear": lambda m: P.token_subset_lora_linear(x, codes, bias, a, b, 1.0, 0.0, None,
                                                                         pos, **nf4(m)),
        "token_subset_vera_linear": lambda m: P.token_subset_vera_linear(x, codes, bias, va, vb, ld, lb, 0.0,
                                                                         None, pos, **nf4(m)),
    }


@pytest.mark.parametrize("op", list(_calls(*nf4_layer(), torch.zeros(2, 4, N_IN))))
def test_absmax_requiring_grad_is_refused_at_once(op):
    """An NF4 weight is frozen: its codes cannot require grad (uint8), and an
    absmax that does is refused at the forward call, not silently given none."""
    codes, absmax, bias = nf4_layer()
    x = torch.randn(2, 4, N_IN, requires_grad=True)
    call = _calls(codes, absmax, bias, x)[op]
    call(absmax).sum().backward()  # frozen absmax: trains
    assert x.grad is not None
    with pytest.raises(RuntimeError, match=f"pypeft.{op}: weight_absmax is part of the frozen NF4 weight"):
        call(absmax.clone().requires_grad_())


def test_base_rows_equal_nf4_linear():
    """Over an NF4 base, a fresh LoRA adapter (B = 0) and the mixed ops' base
    rows give pypeft.ops.nf4_linear's output bit for bit, as they give
    F.linear's over a dense weight."""
    codes, absmax, bias = nf4_layer(blocksize=64, seed=5)
    x = torch.randn(4, 3, N_IN)
    want = P.nf4_linear(x, codes, absmax, 64, bias)
    a, zero_b = torch.randn(R_, N_IN), torch.zeros(N_OUT, R_)
    assert torch.equal(P.lora_linear(x, codes, bias, a, zero_b, 1.0, weight_absmax=absmax), want)
    mixed = P.lora_linear_mixed(x, codes, bias, [a], [torch.randn(N_OUT, R_)], [1.0], [-1, 0, -1, 0],
                                weight_absmax=absmax)
    assert torch.equal(mixed[0::2], want[0::2])
    assert not torch.equal(mixed[1::2], want[1::2])
    vera = P.vera_linear_mixed(x, codes, bias, torch.randn(R_, N_IN), torch.randn(N_OUT, R_), torch.randn(1, R_),
                               torch.randn(1, N_OUT), [0, -1, -1, 0], weight_absmax=absmax)
    assert torch.equal(vera[1:3], want[1:3])


@requires_cuda
def test_cuda_matches_cpu_over_nf4():
    codes, absmax, bias = nf4_layer(blocksize=64, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, N_IN, generator=g, requires_grad=True)
    a = torch.randn(R_, N_IN, generator=g, requires_grad=True)
    b = torch.randn(N_OUT, R_, generator=g, requires_grad=True)
    outs = []
    for device in ("cpu", "cuda"):
        ins = [t.detach().to(device).requires_grad_() for t in (x, a, b)]
        y = P.lora_linear(ins[0], codes.to(device), bias.to(device), ins[1], ins[2], 0.5, 0.3, torch.tensor(11),
                          weight_absmax=absmax.to(device))
        y.square().sum().backward()
        outs.append([y.detach().cpu()] + [t.grad.cpu() for t in ins])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
