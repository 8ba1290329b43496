"""pypeft::lora_linear: what is particular to it. (The op contract — opcheck,
the reference on edge shapes, gradcheck, compile, TorchScript, what it saves,
bad input — runs from tests/op_table.py in test_op_contract.py.) Here: random
shapes against the reference, the auxiliary output u, low-precision dtypes,
the dropout mask, and CUDA against the CPU."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft.ops import lora_linear

op = torch.ops.pypeft.lora_linear.default


def make_inputs(lead=(3, 5), n_in=16, n_out=12, r=4, dtype=torch.float32, adapter_dtype=None,
                device="cpu", bias=True, requires_grad=False, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(device)

    x = rnd(*lead, n_in)
    w = rnd(n_out, n_in)
    b = rnd(n_out) if bias else None
    a = rnd(r, n_in, dt=adapter_dtype)
    bb = rnd(n_out, r, dt=adapter_dtype)  # non-zero so the adapter matters
    if requires_grad:
        for t in (x, w, b, a, bb):
            if t is not None:
                t.requires_grad_(True)
    return x, w, b, a, bb


def grads(y, inputs, grad_out):
    ins = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, ins, grad_out)


def check_against_reference(x, w, b, a, bb, scale, p, seed, atol, rtol):
    """Forward and all input grads of the op equal the reference's, computed in float64."""
    ours = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, a, bb)]
    ref = [t.detach().double().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, a, bb)]
    seed_t = torch.tensor(seed) if p > 0 else None
    y = lora_linear(*ours, scale, p, seed_t)
    y_ref = R.lora_linear(*ref, scale, p, seed)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = grads(y, ours, g.to(y.dtype).to(y.device))
    want = grads(y_ref, ref, g.to(y_ref.device))
    for name, gg, ww, t in zip("x w b a B".split(), got, want, [t for t in ours if t is not None]):
        assert gg.dtype == t.dtype, name
        assert gg.shape == t.shape, name
        torch.testing.assert_close(gg.double(), ww, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


def test_gradient_flowing_into_u_is_used():
    """u is an output too; a loss on it must reach x and A as the reference says."""
    x, w, b, a, bb = make_inputs(dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(5)
    y, u = op(x, w, b, a, bb, 2.0, 0.3, seed)
    loss = y.sum() + (u ** 2).sum()
    gx, ga = torch.autograd.grad(loss, (x, a))
    xr, ar = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    ur = R.dropout(xr, 5, 0.3) @ ar.t()
    lr = R.lora_linear(xr, w, b, ar, bb, 2.0, 0.3, 5).sum() + (ur ** 2).sum()
    gxr, gar = torch.autograd.grad(lr, (xr, ar))
    torch.testing.assert_close(gx, gxr)
    torch.testing.assert_close(ga, gar)


# --- against the reference ----------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(0, 6), min_size=0, max_size=3), n_in=st.integers(1, 40),
       n_out=st.integers(1, 40), r=st.integers(1, 48), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       bias=st.booleans(), scale=st.floats(-4, 4), seed=st.integers(-(2**63), 2**63 - 1))
def test_matches_reference_random_shapes(lead, n_in, n_out, r, p, bias, scale, seed):
    inputs = make_inputs(lead=tuple(lead), n_in=n_in, n_out=n_out, r=r, dtype=torch.float64, bias=bias)
    check_against_reference(*inputs, scale=scale, p=p, seed=seed, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16 adapter", "fp32 adapter"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bfloat16_activations(device, adapter_dtype, p):
    """bf16 x/W/b with bf16 or fp32 adapter weights; grads come back in each input's dtype."""
    inputs = make_inputs(lead=(4, 6), n_in=32, n_out=24, r=8, dtype=torch.bfloat16, adapter_dtype=adapter_dtype,
                         device=device)
    check_against_reference(*inputs, scale=0.5, p=p, seed=3, atol=0.15, rtol=0.05)


@requires_cuda
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32])
def test_float16_on_cuda(adapter_dtype):
    inputs = make_inputs(lead=(4, 6), n_in=32, n_out=24, r=8, dtype=torch.float16, adapter_dtype=adapter_dtype,
                         device="cuda")
    check_against_reference(*inputs, scale=0.5, p=0.25, seed=3, atol=0.05, rtol=0.02)


# --- dropout -----------------------------------------------------------------

def observed_mask(seed, rows, cols, p, device="cpu"):
    """The op's keep-mask, read off with W = 0, A = B = I and x = 1."""
    eye = torch.eye(cols, device=device)
    y = lora_linear(torch.ones(rows, cols, device=device), torch.zeros(cols, cols, device=device), None, eye, eye,
                    1.0, p, torch.tensor(seed))
    return y != 0


@pytest.mark.parametrize("seed", [0, 1, -5, 2**62 + 3])
def test_mask_equals_reference_generator(seed):
    assert torch.equal(observed_mask(seed, 9, 67, 0.3), R.dropout_keep_mask(seed, 9, 67, 0.3))


def test_same_seed_same_mask_forward_and_backward():
    x, w, b, a, bb = make_inputs(lead=(8, 8), n_in=64, n_out=16, r=4, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(1234)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.5, seed)
    y2 = lora_linear(x, w, b, a, bb, 1.0, 0.5, seed)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    g1 = grads(y1, (x, a, bb), g)
    g2 = grads(y2, (x, a, bb), g)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)
    # Backward regenerated the forward's mask: the gradients match the
    # reference run with that mask (and would not with another one).
    check_against_reference(x, w, b, a, bb, scale=1.0, p=0.5, seed=1234, atol=1e-10, rtol=1e-10)
    y3 = lora_linear(x, w, b, a, bb, 1.0, 0.5, torch.tensor(1235))
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    keep = observed_mask(99, 256, 512, p)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Rows and columns are not correlated: every column keeps about 1 - p.
    col_frac = keep.float().mean(0)
    assert (col_frac - (1 - p)).abs().max() < 6 * (p * (1 - p) / 256) ** 0.5


def test_p_zero_is_exact_and_ignores_seed():
    x, w, b, a, bb = make_inputs()
    y0 = lora_linear(x, w, b, a, bb, 1.0, 0.0, None)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.0, torch.tensor(77))
    assert torch.equal(y0, y1)
    torch.testing.assert_close(y0, R.lora_linear(x, w, b, a, bb, 1.0), atol=1e-5, rtol=1e-5)


# --- CUDA -----------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("seed_device", ["cpu", "cuda"])
def test_cuda_matches_cpu_with_the_same_mask(seed_device):
    x, w, b, a, bb = make_inputs(lead=(37, 3), n_in=300, n_out=70, r=8, dtype=torch.float64)
    seed = 2**40 + 17
    y_cpu = lora_linear(x, w, b, a, bb, 0.7, 0.3, torch.tensor(seed))
    cu = [t.cuda() for t in (x, w, b, a, bb)]
    y_cuda = lora_linear(*cu, 0.7, 0.3, torch.tensor(seed, device=seed_device))
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, atol=1e-10, rtol=1e-10)
    assert torch.equal(observed_mask(seed, 11, 97, 0.3, "cuda").cpu(), R.dropout_keep_mask(seed, 11, 97, 0.3))
