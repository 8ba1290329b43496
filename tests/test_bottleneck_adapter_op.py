"""pypeft::bottleneck_adapter: what is particular to it. (The op contract —
opcheck, the reference on edge shapes, gradcheck, compile, TorchScript, what
it saves, bad input — runs from tests/op_table.py in test_op_contract.py.)
Here: the eager torch.nn composition in every activation, random shapes in
float64 against the reference, the dropout mask, low-precision dtypes, the
auxiliary output p, what it saves against the eager composition, and CUDA
against the CPU."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import reference as R
import saved_tensors
from conftest import DEVICES, requires_cuda
from pypeft.ops import bottleneck_adapter
from pypeft.ops.bottleneck_adapter import ACTIVATIONS

op = torch.ops.pypeft.bottleneck_adapter.default

NN_ACTIVATIONS = {
    "relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "leaky_relu": nn.LeakyReLU(), "identity": nn.Identity(),
}


class EagerAdapter(nn.Module):
    """The adapter block as torch.nn modules: Linear → activation → Linear → · scale → dropout, plus the residual."""

    def __init__(self, d, m, activation, scale, dropout=0.0, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(d, m, dtype=dtype)
        self.act = NN_ACTIVATIONS[activation]
        self.up = nn.Linear(m, d, dtype=dtype)
        nn.init.normal_(self.up.weight)  # a trained-looking adapter: zeros would hide the up path
        self.drop = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, z, residual):
        return self.drop(self.up(self.act(self.down(z))) * self.scale) + residual


def ours(module, z, residual, activation, p=0.0, seed=None):
    return bottleneck_adapter(z, residual, module.down.weight, module.down.bias, module.up.weight, module.up.bias,
                              module.scale, activation, p, seed)


def test_the_python_face_lists_the_kernels_activations():
    assert set(ACTIVATIONS) == set(NN_ACTIVATIONS) == set(R.ADAPTER_ACTIVATIONS)


@pytest.mark.parametrize("activation", list(NN_ACTIVATIONS))
def test_equals_the_eager_nn_composition(activation):
    torch.manual_seed(0)
    module = EagerAdapter(24, 6, activation, scale=1.7)
    z = torch.randn(4, 9, 24, requires_grad=True)
    residual = torch.randn(4, 9, 24, requires_grad=True)
    want = module(z, residual)
    got = ours(module, z, residual, activation)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    wrt = (z, residual, *module.parameters())
    for name, a, b in zip(("z", "residual", "w_down", "b_down", "w_up", "b_up"),
                          torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


# --- float64 against the reference -----------------------------------------------------

def make_inputs(lead=(3, 5), d=16, m=4, dtype=torch.float64, weight_dtype=None, device="cpu", bias=True,
                residual=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    weight_dtype = weight_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(device)

    return dict(z=rnd(*lead, d), residual=rnd(*lead, d) if residual else None, w_down=rnd(m, d, dt=weight_dtype),
                b_down=rnd(m, dt=weight_dtype) if bias else None, w_up=rnd(d, m, dt=weight_dtype),
                b_up=rnd(d, dt=weight_dtype) if bias else None)


def check_against_reference(inputs, scale, activation, p, seed, atol, rtol):
    """Output and every input's gradient equal the reference's, computed in float64 on the CPU."""
    names = [k for k, v in inputs.items() if v is not None]
    mine = {k: v.detach().clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    theirs = {k: v.detach().cpu().double().requires_grad_() if v is not None else None for k, v in inputs.items()}
    seed_t = torch.tensor(seed) if p > 0 else None
    y = bottleneck_adapter(*mine.values(), scale, activation, p, seed_t)
    y_ref = R.bottleneck_adapter(*theirs.values(), scale, activation, p, seed)
    assert y.dtype == inputs["z"].dtype and y.is_contiguous()
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [mine[k] for k in names], g.to(y), allow_unused=True)
    want = torch.autograd.grad(y_ref, [theirs[k] for k in names], g, allow_unused=True)
    for name, a, b in zip(names, got, want):
        t = mine[name]
        a = torch.zeros_like(t) if a is None else a  # empty batch: nothing reaches the input
        b = torch.zeros(t.shape, dtype=torch.float64) if b is None else b
        assert a.dtype == t.dtype and a.shape == t.shape, name
        torch.testing.assert_close(a.cpu().double(), b, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(0, 6), min_size=0, max_size=3), d=st.integers(1, 40), m=st.integers(1, 48),
       activation=st.sampled_from(ACTIVATIONS), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), bias=st.booleans(),
       residual=st.booleans(), scale=st.floats(-4, 4), seed=st.integers(-(2**63), 2**63 - 1))
def test_matches_reference_random_shapes(lead, d, m, activation, p, bias, residual, scale, seed):
    inputs = make_inputs(lead=tuple(lead), d=d, m=m, bias=bias, residual=residual)
    check_against_reference(inputs, scale, activation, p, seed, atol=1e-9, rtol=1e-9)


def test_gradient_flowing_into_p_is_used():
    """p is an output too; a loss on it must reach z and the down projection as the reference says."""
    inputs = make_inputs()
    mine = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, p = op(*mine.values(), 0.8, "silu", 0.3, torch.tensor(9))
    loss = (out ** 2).sum() + (p ** 3).sum()
    got = torch.autograd.grad(loss, [mine["z"], mine["w_down"], mine["b_down"]])
    theirs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    p_ref = nn.functional.linear(theirs["z"], theirs["w_down"], theirs["b_down"])
    loss_ref = (R.bottleneck_adapter(*theirs.values(), 0.8, "silu", 0.3, 9) ** 2).sum() + (p_ref ** 3).sum()
    want = torch.autograd.grad(loss_ref, [theirs["z"], theirs["w_down"], theirs["b_down"]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


class BackwardCalls(TorchDispatchMode):
    """Records the output_mask and results of every bottleneck_adapter_backward call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.pypeft.bottleneck_adapter_backward.default:
            self.calls.append((list(args[-1]), out))
        return out


def test_a_frozen_adapter_skips_the_weight_gradients():
    """Only z and residual train: backward is asked for grad_z alone and computes nothing else."""
    inputs = make_inputs()
    z, residual = inputs["z"].requires_grad_(), inputs["residual"].requires_grad_()
    y = bottleneck_adapter(*inputs.values(), 0.5, "gelu", 0.2, torch.tensor(4))
    with BackwardCalls() as mode:
        y.sum().backward()
    [(mask, grads)] = mode.calls
    assert mask == [True, False, False, False, False]
    assert grads[0] is not None and all(g is None for g in grads[1:])
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))
    # Only the residual trains: the backward op is not called at all.
    y = bottleneck_adapter(inputs["z"].detach(), residual, *list(inputs.values())[2:], 0.5, "gelu", 0.2,
                           torch.tensor(4))
    with BackwardCalls() as mode:
        y.sum().backward()
    assert mode.calls == []
    torch.testing.assert_close(residual.grad, 2 * torch.ones_like(residual))


# --- dropout -----------------------------------------------------------------------------

def observed_mask(seed, rows, d, p, device="cpu"):
    """The op's keep-mask over the output, read off with W_up = 0, b_up = 1, scale 1 and no residual."""
    z = torch.randn(rows, d, device=device)
    y = bottleneck_adapter(z, None, torch.randn(3, d, device=device), None, torch.zeros(d, 3, device=device),
                           torch.ones(d, device=device), 1.0, "relu", p, torch.tensor(seed))
    return y != 0


@pytest.mark.parametrize("seed", [0, 1, -5, 2**62 + 3])
def test_mask_equals_reference_generator(seed):
    assert torch.equal(observed_mask(seed, 9, 67, 0.3), R.dropout_keep_mask(seed, 9, 67, 0.3))


def test_kept_values_are_scaled_by_one_over_one_minus_p():
    y = bottleneck_adapter(torch.randn(5, 40), None, torch.randn(2, 40), None, torch.zeros(40, 2), torch.ones(40),
                           1.0, "relu", 0.25, torch.tensor(3))
    values = y.unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.75)


def test_backward_regenerates_the_forward_mask():
    inputs = make_inputs(lead=(8, 8), d=64, m=4)
    mine = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y1 = bottleneck_adapter(*mine.values(), 1.0, "tanh", 0.5, torch.tensor(1234))
    y2 = bottleneck_adapter(*mine.values(), 1.0, "tanh", 0.5, torch.tensor(1234))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, bottleneck_adapter(*mine.values(), 1.0, "tanh", 0.5, torch.tensor(1235)))
    # The gradients equal the reference run with the forward's mask (and would not with another one).
    check_against_reference(inputs, 1.0, "tanh", 0.5, 1234, atol=1e-10, rtol=1e-10)


# --- what it saves -----------------------------------------------------------------------

def test_saves_z_and_p_only_less_than_the_eager_composition():
    torch.manual_seed(0)
    d, m, rows = 64, 8, 48
    module = EagerAdapter(d, m, "gelu", scale=2.0, dropout=0.1)
    z = torch.randn(rows, d, requires_grad=True)
    residual = torch.randn(rows, d, requires_grad=True)
    seed = torch.tensor(3)
    params = [*module.parameters(), seed]
    with saved_tensors.saved(exclude=params) as record:
        ours(module, z, residual, "gelu", 0.1, seed)
    assert record.nbytes == z.untyped_storage().nbytes() + rows * m * z.element_size(), record.shapes()
    with saved_tensors.saved(exclude=params) as eager:
        module(z, residual)
    # The eager block also keeps its dropout mask (N × d) and the activation's output.
    assert record.nbytes < eager.nbytes


# --- low precision ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16 weights", "fp32 weights"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bfloat16_activations(device, weight_dtype, p):
    """bf16 z / residual with bf16 or fp32 adapter weights; gradients come back in each input's dtype."""
    inputs = make_inputs(lead=(4, 6), d=32, m=8, dtype=torch.bfloat16, weight_dtype=weight_dtype, device=device)
    check_against_reference(inputs, 0.5, "gelu", p, 3, atol=0.1, rtol=0.05)


@requires_cuda
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
def test_float16_on_cuda(weight_dtype):
    inputs = make_inputs(lead=(4, 6), d=32, m=8, dtype=torch.float16, weight_dtype=weight_dtype, device="cuda")
    check_against_reference(inputs, 0.5, "silu", 0.25, 3, atol=0.05, rtol=0.02)


# --- CUDA -----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("seed_device", ["cpu", "cuda"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_matches_cpu_with_the_same_mask(seed_device, activation):
    inputs = make_inputs(lead=(37, 3), d=300, m=24)
    seed = 2**40 + 17
    y_cpu = bottleneck_adapter(*inputs.values(), 0.7, activation, 0.3, torch.tensor(seed))
    y_cuda = bottleneck_adapter(*[t.cuda() for t in inputs.values()], 0.7, activation, 0.3,
                                torch.tensor(seed, device=seed_device))
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, atol=1e-10, rtol=1e-10)
    check_against_reference({k: v.cuda() for k, v in inputs.items()}, 0.7, activation, 0.3, seed,
                            atol=1e-10, rtol=1e-10)
    assert torch.equal(observed_mask(seed, 11, 97, 0.3, "cuda").cpu(), R.dropout_keep_mask(seed, 11, 97, 0.3))
