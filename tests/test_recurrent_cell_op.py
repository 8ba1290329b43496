"""pypeft::rnn_cell, gru_cell, lstm_cell: what is particular to them (the op
contract, against torch.nn.RNNCell / GRUCell / LSTMCell with the same
weights, runs from tests/op_table.py in test_op_contract.py). bfloat16 and
float16 against float32, the LSTM's gradient through c alone, and the CPU /
CUDA kernels' own float σ and tanh over a wide range."""

import pytest
import torch

from conftest import DEVICES, requires_cuda
from pypeft.ops import gru_cell, lstm_cell, rnn_cell

NN = {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}
WRAPPERS = {"rnn": rnn_cell, "gru": gru_cell, "lstm": lstm_cell}


def make_module(cell, n_in=7, H=5, bias=True, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    return NN[cell](n_in, H, bias=bias).to(dtype=dtype, device=device)


def make_state(cell, N, n_in, H, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()

    return rnd(N, n_in), rnd(N, H), (rnd(N, H) if cell == "lstm" else None)


def call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """(h', c') (c' None unless lstm) through the typed wrappers."""
    if cell == "lstm":
        return lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return WRAPPERS[cell](x, h, w_ih, w_hh, b_ih, b_hh), None


def compare(cell, N, bias, dtype=torch.float64, device="cpu", atol=1e-12, rtol=1e-10, layout=None):
    n_in, H = 7, 5
    m = make_module(cell, n_in, H, bias=bias, dtype=dtype, device=device)
    x, h, c = make_state(cell, N, n_in, H, dtype, device)
    params = [m.weight_ih, m.weight_hh] + ([m.bias_ih, m.bias_hh] if bias else [None, None])
    args = [x, h, c, *params]
    if layout is not None:
        args = [layout(t) if t is not None else None for t in args]
    want_h, want_c = m(x, (h, c)) if cell == "lstm" else (m(x, h), None)
    got_h, got_c = call(cell, *args)
    torch.testing.assert_close(got_h, want_h, atol=atol, rtol=rtol)
    outs_got, outs_want = [got_h], [want_h]
    if cell == "lstm":
        torch.testing.assert_close(got_c, want_c, atol=atol, rtol=rtol)
        outs_got.append(got_c)
        outs_want.append(want_c)
    g = torch.Generator().manual_seed(5)
    grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs_want]
    leaves = [t for t in (x, h, c, *params) if t is not None]
    got = torch.autograd.grad(outs_got, leaves, grads_out)
    want = torch.autograd.grad(outs_want, leaves, grads_out)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda msg: f"grad of input {i}: {msg}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(NN))
def test_bfloat16_close_to_float32(device, cell):
    compare_low = dict(atol=0.03, rtol=0.03)
    m = make_module(cell, 32, 16, device=device, dtype=torch.float32)
    x, h, c = make_state(cell, 24, 32, 16, torch.float32, device)
    params = [m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh]
    low = [t.detach().bfloat16().requires_grad_() if t is not None else None for t in (x, h, c, *params)]
    hi_out, lo_out = call(cell, x, h, c, *params), call(cell, *low)
    for a, b in zip(lo_out, hi_out):
        if b is not None:
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b, **compare_low)
    outs_hi = [o for o in hi_out if o is not None]
    outs_lo = [o for o in lo_out if o is not None]
    g = [torch.randn_like(o) for o in outs_hi]
    leaves_hi = [t for t in (x, h, c, *params) if t is not None]
    leaves_lo = [t for t in low if t is not None]
    got = torch.autograd.grad(outs_lo, leaves_lo, [t.bfloat16() for t in g])
    want = torch.autograd.grad(outs_hi, leaves_hi, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, atol=0.03 * b.abs().max().item() + 0.02, rtol=0.05)


def test_lstm_gradient_through_c_only():
    m = make_module("lstm")
    x, h, c = make_state("lstm", 4, 7, 5)
    params = [m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh]
    _, c_new = lstm_cell(x, h, c, *params)
    _, c_ref = m(x, (h, c))
    got = torch.autograd.grad(c_new.sum(), (x, h, c, *params))
    want = torch.autograd.grad(c_ref.sum(), (x, h, c, *params))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@requires_cuda
@pytest.mark.parametrize("cell", list(NN))
def test_float16_on_cuda(cell):
    compare(cell, 9, True, dtype=torch.float16, device="cuda", atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("cell", list(NN))
def test_float32_gate_math_over_a_wide_range(cell):
    """The CPU / CUDA kernels' own float σ and tanh (branch-free polynomials)
    against torch's, from tiny pre-activations to saturated ones; NaN stays in its row."""
    m = make_module(cell, 7, 5, dtype=torch.float32)
    x, h, c = make_state(cell, 64, 7, 5, torch.float32)
    with torch.no_grad():
        x.mul_(torch.logspace(-4, 2, 64).unsqueeze(1))  # row scales 1e-4 .. 100
        x[5, 2] = float("nan")
    params = [m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh]
    with torch.no_grad():
        got = call(cell, x, h, c, *params)
        want = (m(x, (h, c))) if cell == "lstm" else (m(x, h), None)
    for a, b in zip(got, want):
        if b is None:
            continue
        assert torch.equal(a.isnan(), b.isnan()) and a[5].isnan().all()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)
