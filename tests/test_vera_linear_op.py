"""pypeft::vera_linear: what is particular to it (the op contract runs from
tests/op_table.py in test_op_contract.py): random shapes against the
reference, bfloat16, λ_b = 0 gives the base layer, the shared matrices stay
frozen, CUDA against the CPU."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft.ops import vera_linear



def make_inputs(lead=(3, 5), n_in=16, n_out=12, r=6, max_in=20, max_out=14, dtype=torch.float32,
                adapter_dtype=None, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(device)

    return dict(x=rnd(*lead, n_in), weight=rnd(n_out, n_in), bias=rnd(n_out) if bias else None,
                vera_a=rnd(r, max_in, dt=adapter_dtype), vera_b=rnd(max_out, r, dt=adapter_dtype),
                lambda_d=rnd(r, dt=adapter_dtype), lambda_b=rnd(n_out, dt=adapter_dtype))


TRAINED = ("x", "lambda_d", "lambda_b")


def check_against_reference(inputs, p, seed, atol, rtol, atol_of_max=0.0):
    """atol_of_max: an absolute tolerance of that share of the largest reference
    value, for bf16, where sums that cancel amplify rounding."""

    def tol(ref):
        return max(atol, atol_of_max * ref.abs().max().item()) if ref.numel() else atol

    ours = {k: (v.detach().clone().requires_grad_(k in TRAINED) if v is not None else None) for k, v in inputs.items()}
    ref = {k: (v.detach().double().clone().requires_grad_(k in TRAINED) if v is not None else None)
           for k, v in inputs.items()}
    y = vera_linear(*ours.values(), p, torch.tensor(seed) if p > 0 else None)
    y_ref = R.vera_linear(*ref.values(), p, seed)
    torch.testing.assert_close(y.double(), y_ref, atol=tol(y_ref), rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [ours[k] for k in TRAINED], g.to(y.dtype).to(y.device))
    want = torch.autograd.grad(y_ref, [ref[k] for k in TRAINED], g.to(y_ref.device))
    for name, a, b in zip(TRAINED, got, want):
        assert a.dtype == ours[name].dtype and a.shape == ours[name].shape, name
        torch.testing.assert_close(a.double(), b, atol=tol(b), rtol=rtol,
                                   msg=lambda m: f"grad {name}: {m}")


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(0, 5), max_size=3), n_in=st.integers(1, 24), n_out=st.integers(1, 24),
       r=st.integers(1, 40), extra_in=st.integers(0, 8), extra_out=st.integers(0, 8),
       p=st.sampled_from([0.0, 0.2, 0.7]), bias=st.booleans(), seed=st.integers(-(2**63), 2**63 - 1))
def test_matches_reference_random_shapes(lead, n_in, n_out, r, extra_in, extra_out, p, bias, seed):
    inputs = make_inputs(lead=tuple(lead), n_in=n_in, n_out=n_out, r=r, max_in=n_in + extra_in,
                         max_out=n_out + extra_out, dtype=torch.float64, bias=bias)
    check_against_reference(inputs, p, seed, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_activations(device, adapter_dtype):
    inputs = make_inputs(lead=(4, 6), n_in=32, n_out=24, r=16, max_in=40, max_out=30, dtype=torch.bfloat16,
                         adapter_dtype=adapter_dtype, device=device)
    check_against_reference(inputs, 0.25, 3, atol=0.05, rtol=0.02, atol_of_max=0.02)


def test_starts_equal_to_the_base_with_lambda_b_zero():
    i = make_inputs()
    i["lambda_b"] = torch.zeros_like(i["lambda_b"])
    base = torch.nn.functional.linear(i["x"], i["weight"], i["bias"])
    assert torch.equal(vera_linear(*i.values(), 0.0, None), base)


def test_shared_matrices_must_be_frozen():
    i = make_inputs()
    i["vera_a"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="vera_a and vera_b are frozen"):
        vera_linear(*i.values(), 0.0, None).sum().backward()


@requires_cuda
def test_cuda_matches_cpu_with_the_same_mask():
    i = make_inputs(lead=(37, 3), n_in=300, n_out=70, r=8, max_in=310, max_out=80, dtype=torch.float64)
    y_cpu = vera_linear(*i.values(), 0.3, torch.tensor(99))
    y_cuda = vera_linear(*[v.cuda() if v is not None else None for v in i.values()], 0.3, torch.tensor(99))
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, atol=1e-10, rtol=1e-10)
