"""pypeft::vera_linear against tests/reference.py, opcheck, gradcheck,
torch.compile, TorchScript, what it saves, and its argument checks."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.library import opcheck

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft.ops import vera_linear

op = torch.ops.pypeft.vera_linear.default
backward_op = torch.ops.pypeft.vera_linear_backward.default


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(device, p, bias):
    inputs = make_inputs(device=device, bias=bias)
    for k in TRAINED:
        inputs[k].requires_grad_(True)
    opcheck(op, (*inputs.values(), p, torch.tensor(7) if p else None))
    i = make_inputs(device=device)
    gy, u = torch.randn(3, 5, 12, device=device), torch.randn(3, 5, 6, device=device)
    for mask in ([True] * 5, [True, False, False, True, True], [False, False, False, False, True]):
        opcheck(backward_op, (gy, None, i["x"], i["weight"], i["vera_a"], i["vera_b"], i["lambda_d"],
                              i["lambda_b"], u, p, torch.tensor(7) if p else None, mask))


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(p):
    i = make_inputs(lead=(2, 3), n_in=5, n_out=4, r=3, max_in=7, max_out=6, dtype=torch.float64)
    seed = torch.tensor(11) if p else None

    def fn(x, weight, bias, lambda_d, lambda_b):
        return vera_linear(x, weight, bias, i["vera_a"], i["vera_b"], lambda_d, lambda_b, p, seed)

    args = [i[k].requires_grad_() for k in ("x", "weight", "bias", "lambda_d", "lambda_b")]
    assert torch.autograd.gradcheck(fn, args)


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


def test_saves_only_u():
    i = make_inputs(lead=(16, 8), n_in=64, n_out=48, r=32, max_in=80, max_out=60)
    for k in TRAINED:
        i[k].requires_grad_(True)
    params = {i[k].untyped_storage().data_ptr() for k in ("weight", "bias", "vera_a", "vera_b", "lambda_d",
                                                           "lambda_b")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = vera_linear(*i.values(), 0.3, torch.tensor(1))
    acts = [t for t in saved if t.untyped_storage().data_ptr() not in params and t.numel() > 1]
    assert [tuple(t.shape) for t in acts] == [(16, 8, 32)]  # u only: nothing [.., in] or [.., out]
    y.sum().backward()
    assert i["x"].grad is not None and i["lambda_d"].grad is not None


def test_starts_equal_to_the_base_with_lambda_b_zero():
    i = make_inputs()
    i["lambda_b"] = torch.zeros_like(i["lambda_b"])
    base = torch.nn.functional.linear(i["x"], i["weight"], i["bias"])
    assert torch.equal(vera_linear(*i.values(), 0.0, None), base)


def test_compile_fullgraph_and_torchscript():
    torch._dynamo.reset()
    i = make_inputs()
    for k in TRAINED:
        i[k].requires_grad_(True)

    def step(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, seed):
        return vera_linear(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, 0.1, seed).pow(2).mean()

    args = (*i.values(), torch.tensor(4))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(*args)
    torch.testing.assert_close(loss, step(*args))
    got = torch.autograd.grad(loss, [i[k] for k in TRAINED])
    want = torch.autograd.grad(step(*args), [i[k] for k in TRAINED])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    @torch.jit.script
    def scripted(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ld: torch.Tensor,
                 lb: torch.Tensor) -> torch.Tensor:
        return torch.ops.pypeft.vera_linear(x, w, None, a, b, ld, lb, 0.0, None)[0]

    d = {k: v.detach() for k, v in i.items() if v is not None}
    torch.testing.assert_close(
        scripted(d["x"], d["weight"], d["vera_a"], d["vera_b"], d["lambda_d"], d["lambda_b"]),
        R.vera_linear(d["x"], d["weight"], None, d["vera_a"], d["vera_b"], d["lambda_d"], d["lambda_b"]),
        atol=1e-5, rtol=1e-5)


BAD = {
    "layer wider than shared A": (dict(vera_a=torch.randn(6, 15)), ValueError, "'vera_a'", "max_in >= in_features 16"),
    "layer taller than shared B": (dict(vera_b=torch.randn(11, 6)), ValueError, "'vera_b'", "max_out >= out_features 12"),
    "B rank": (dict(vera_b=torch.randn(14, 5)), ValueError, "'vera_b'", "rank r"),
    "lambda_d size": (dict(lambda_d=torch.randn(5)), ValueError, "'lambda_d'", "[5]"),
    "lambda_b size": (dict(lambda_b=torch.randn(13)), ValueError, "'lambda_b'", "[13]"),
    "lambda dtype": (dict(lambda_b=torch.randn(12, dtype=torch.float64)), TypeError, "'lambda_b'", "Double"),
    "fp32 adapters, fp64 x": (dict(x=torch.randn(3, 5, 16, dtype=torch.float64),
                                   weight=torch.randn(12, 16, dtype=torch.float64), bias=None),
                              TypeError, "'lora_a'", "Float"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    changes, exc, arg, got = BAD[case]
    i = make_inputs()
    i.update(changes)
    with pytest.raises(exc) as info:
        op(*i.values(), 0.0, None)
    msg = str(info.value)
    assert arg in msg and "expected" in msg and got in msg, msg


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
