"""pypeft::lora_linear against tests/reference.py, torch.library.opcheck,
gradcheck, torch.compile, TorchScript, and its argument checks."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.library import opcheck

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft.ops import lora_linear

op = torch.ops.pypeft.lora_linear.default
backward_op = torch.ops.pypeft.lora_linear_backward.default


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


# --- opcheck ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(device, p, bias, dtype):
    x, w, b, a, bb = make_inputs(dtype=dtype, device=device, bias=bias, requires_grad=True)
    seed = torch.tensor(7, device=device) if p > 0 else None
    opcheck(op, (x, w, b, a, bb, 0.5, p, seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True] * 5, [True, False, False, True, True], [False, False, False, True, False],
                                  [False, True, True, False, False]])
@pytest.mark.parametrize("with_grad_u", [False, True])
def test_opcheck_backward(device, mask, with_grad_u):
    x, w, _, a, bb = make_inputs(device=device)
    gy = torch.randn(3, 5, 12, device=device)
    u = torch.randn(3, 5, 4, device=device)
    gu = torch.randn(3, 5, 4, device=device) if with_grad_u else None
    opcheck(backward_op, (gy, gu, x, w, a, bb, u, 2.0, 0.25, torch.tensor(3), mask))


# --- gradcheck --------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(p, bias):
    x, w, b, a, bb = make_inputs(lead=(2, 3), n_in=6, n_out=5, r=3, dtype=torch.float64, bias=bias,
                                 requires_grad=True)
    seed = torch.tensor(11) if p > 0 else None
    fn = lambda *t: lora_linear(*t, 1.5, p, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def test_second_order_gradients_fail_loudly():
    x, w, b, a, bb = make_inputs(dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, w, b, a, bb, 1.0)
    gx, = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        gx.sum().backward()


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

SHAPE_CASES = {
    "empty batch": dict(lead=(0,), n_in=8, n_out=6, r=2),
    "empty middle dim": dict(lead=(3, 0), n_in=8, n_out=6, r=2),
    "one token": dict(lead=(1,), n_in=8, n_out=6, r=2),
    "1-D x": dict(lead=(), n_in=8, n_out=6, r=2),
    "r=1": dict(lead=(4, 3), n_in=8, n_out=6, r=1),
    "r > in and out": dict(lead=(4, 3), n_in=5, n_out=3, r=9),
    "many rows (several blocks per thread)": dict(lead=(4, 700), n_in=300, n_out=40, r=8),
}


@pytest.mark.parametrize("case", SHAPE_CASES, ids=list(SHAPE_CASES))
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_matches_reference_edge_shapes(case, p):
    check_against_reference(*make_inputs(**SHAPE_CASES[case], dtype=torch.float32), scale=0.75, p=p, seed=42,
                            atol=1e-3, rtol=1e-3)  # fp32 sums over up to 2800 rows


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_matches_reference_non_contiguous_x(p):
    x, w, b, a, bb = make_inputs(lead=(6, 4), n_in=10, n_out=7, r=3)
    x_t = torch.randn(10, 4, 6).permute(2, 1, 0)           # transposed: inner stride != 1
    x_s = torch.randn(6, 4, 20)[..., ::2]                   # strided last dim
    x_r = torch.randn(12, 4, 10)[::2]                       # strided rows
    for xn in (x_t, x_s, x_r):
        assert not xn.is_contiguous()
        check_against_reference(xn, w, b, a, bb, scale=2.0, p=p, seed=9, atol=1e-4, rtol=1e-4)
        # Same values and same mask as the contiguous copy: the mask follows
        # logical positions, not memory layout.
        s = torch.tensor(9) if p else None
        torch.testing.assert_close(lora_linear(xn, w, b, a, bb, 2.0, p, s),
                                   lora_linear(xn.contiguous(), w, b, a, bb, 2.0, p, s))


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


# --- what backward keeps ------------------------------------------------------

def test_saves_only_x_and_u_for_backward():
    x, w, b, a, bb = make_inputs(lead=(16, 8), n_in=64, n_out=48, r=4, requires_grad=True)
    params = {t.data_ptr() for t in (w, b, a, bb)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 1.0, 0.3, torch.tensor(1))
    activations = {t.untyped_storage().data_ptr(): t for t in saved if t.data_ptr() not in params}
    big = [t for t in activations.values() if t.numel() > 1]
    assert len(big) == 2
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in big)
    assert any(tuple(t.shape) == (16, 8, 4) for t in big)  # u
    y.sum().backward()


# --- torch.compile and TorchScript --------------------------------------------

def train_step(x, w, b, a, bb, seed):
    y = lora_linear(x, w, b, a, bb, 2.0, 0.1, seed)
    return (y.float() ** 2).mean()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    x, w, b, a, bb = make_inputs(lead=(4, 6), n_in=16, n_out=12, r=4, requires_grad=True)
    compiled = torch.compile(train_step, backend=backend, fullgraph=True, dynamic=True)
    for lead, seed in [((4, 6), 3), ((5, 2), 4)]:  # a second shape and seed: no recompile needed
        xs = torch.randn(*lead, 16, requires_grad=True)
        args = (xs, w, b, a, bb, torch.tensor(seed))
        loss = compiled(*args)
        got = torch.autograd.grad(loss, (xs, a, bb))
        want_loss = train_step(*args)
        want = torch.autograd.grad(want_loss, (xs, a, bb))
        torch.testing.assert_close(loss, want_loss)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_torchscript_function_calls_the_op():
    @torch.jit.script
    def scripted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bb: torch.Tensor,
                 seed: torch.Tensor) -> torch.Tensor:
        return torch.ops.pypeft.lora_linear(x, w, b, a, bb, 0.5, 0.2, seed)[0]

    x, w, b, a, bb = make_inputs()
    assert "pypeft::lora_linear" in str(scripted.graph)
    seed = torch.tensor(8)
    torch.testing.assert_close(scripted(x, w, b, a, bb, seed), R.lora_linear(x, w, b, a, bb, 0.5, 0.2, 8),
                               atol=1e-5, rtol=1e-5)


# --- bad input -------------------------------------------------------------------

def _bad(**changes):
    x, w, b, a, bb = make_inputs()
    args = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scale=1.0, dropout_p=0.1, seed=torch.tensor(1))
    args.update(changes)
    return args


BAD_INPUTS = {
    "x last dim": (_bad(x=torch.randn(3, 5, 15)), ValueError, "'x'", "16"),
    "x 0-D": (_bad(x=torch.tensor(1.0)), ValueError, "'x'", "0-D"),
    "x int": (_bad(x=torch.ones(3, 5, 16, dtype=torch.int64)), TypeError, "'x'", "Long"),
    "x float16 on cpu": (_bad(x=torch.randn(3, 5, 16).half()), TypeError, "'x'", "Half"),
    "weight 1-D": (_bad(weight=torch.randn(12)), ValueError, "'weight'", "2-D"),
    "weight dtype": (_bad(weight=torch.randn(12, 16, dtype=torch.float64)), TypeError, "'weight'", "Double"),
    "bias shape": (_bad(bias=torch.randn(11)), ValueError, "'bias'", "[11]"),
    "lora_a in": (_bad(lora_a=torch.randn(4, 15)), ValueError, "'lora_a'", "[4, 15]"),
    "lora_a rank 0": (_bad(lora_a=torch.randn(0, 16), lora_b=torch.randn(12, 0)), ValueError, "'lora_a'", "r >= 1"),
    "lora_b out": (_bad(lora_b=torch.randn(11, 4)), ValueError, "'lora_b'", "[11, 4]"),
    "lora_b rank mismatch": (_bad(lora_b=torch.randn(12, 5)), ValueError, "'lora_b'", "rank r"),
    "lora_b dtype": (_bad(lora_b=torch.randn(12, 4, dtype=torch.float64)), TypeError, "'lora_b'", "Double"),
    "fp32 adapter with fp64 x": (_bad(x=torch.randn(3, 5, 16, dtype=torch.float64),
                                      weight=torch.randn(12, 16, dtype=torch.float64),
                                      bias=torch.randn(12, dtype=torch.float64)), TypeError, "'lora_a'", "Float"),
    "p = 1": (_bad(dropout_p=1.0), ValueError, "'dropout_p'", "[0, 1)"),
    "p < 0": (_bad(dropout_p=-0.1), ValueError, "'dropout_p'", "-0.1"),
    "seed missing": (_bad(seed=None), ValueError, "'seed'", "None"),
    "seed float": (_bad(seed=torch.tensor(1.0)), TypeError, "'seed'", "Float"),
    "seed shape": (_bad(seed=torch.tensor([1, 2])), ValueError, "'seed'", "[2]"),
    "scale inf": (_bad(scale=float("inf")), ValueError, "'scale'", "inf"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    args, exc, arg_name, got = BAD_INPUTS[case]
    with pytest.raises(exc) as info:
        op(*args.values())
    msg = str(info.value)
    assert arg_name in msg and "expected" in msg and got in msg, msg


def test_bad_backward_input_names_the_argument():
    x, w, _, a, bb = make_inputs()
    u = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="'grad_out'.*\\[3, 5, 12\\]"):
        backward_op(torch.randn(3, 5, 11), None, x, w, a, bb, u, 1.0, 0.0, None, [True] * 5)
    with pytest.raises(ValueError, match="'u'"):
        backward_op(torch.randn(3, 5, 12), None, x, w, a, bb, torch.randn(3, 5, 3), 1.0, 0.0, None, [True] * 5)


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


@requires_cuda
def test_cuda_device_mismatch_names_the_argument():
    x, w, b, a, bb = make_inputs(device="cuda")
    with pytest.raises(ValueError, match="'weight'.*cuda"):
        op(x, w.cpu(), b, a, bb, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="'lora_b'"):
        op(x, w, b, a, bb.cpu(), 1.0, 0.0, None)
