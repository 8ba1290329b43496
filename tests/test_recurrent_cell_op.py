"""pypeft::rnn_cell, gru_cell, lstm_cell against torch.nn.RNNCell / GRUCell /
LSTMCell with the same weights (forward and every gradient), gradcheck,
bfloat16, opcheck, torch.compile, TorchScript and argument checks."""

import pytest
import torch
from torch.library import opcheck

from conftest import DEVICES, requires_cuda
from pypeft.ops import gru_cell, lstm_cell, rnn_cell

OPS = {"rnn": torch.ops.pypeft.rnn_cell.default, "gru": torch.ops.pypeft.gru_cell.default,
       "lstm": torch.ops.pypeft.lstm_cell.default}
backward_op = torch.ops.pypeft.recurrent_cell_backward.default
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
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N", [0, 1, 6])
def test_matches_torch_nn_cell(device, cell, bias, N):
    compare(cell, N, bias, device=device)


@pytest.mark.parametrize("cell", list(NN))
def test_non_contiguous_inputs(cell):
    # The same values with transposed strides (1-D tensors: every other element of a wider one).
    def layout(t):
        if t.dim() == 1:
            return torch.stack([t, t], 1)[:, 0]
        return t.t().contiguous().t()

    compare(cell, 4, True, layout=layout)


@pytest.mark.parametrize("cell", list(NN))
def test_gradcheck_float64(cell):
    m = make_module(cell, 3, 2)
    x, h, c = make_state(cell, 3, 3, 2)
    params = [p.detach().requires_grad_() for p in (m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)]
    if cell == "lstm":
        assert torch.autograd.gradcheck(lstm_cell, (x, h, c, *params))
    else:
        assert torch.autograd.gradcheck(WRAPPERS[cell], (x, h, *params))


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(NN))
def test_opcheck(device, cell):
    m = make_module(cell, 5, 3, dtype=torch.float32, device=device)
    x, h, c = make_state(cell, 4, 5, 3, torch.float32, device)
    w = [m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh]
    opcheck(OPS[cell], (x, h, c, *w) if cell == "lstm" else (x, h, *w))
    d = [t.detach() for t in (x, h, *w)]
    c_d = c.detach() if c is not None else None
    gc = torch.randn(4, 3, device=device) if cell == "lstm" else None
    for mask in ([True] * 7, [False, True, cell == "lstm", False, True, False, True]):
        opcheck(backward_op, (torch.randn(4, 3, device=device), gc, d[0], d[1], c_d, d[2], d[3], d[4], None, cell,
                              mask))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    mods = {k: make_module(k, 6, 4, dtype=torch.float32) for k in NN}
    x, h, c = make_state("lstm", 5, 6, 4, torch.float32)
    params = [p for k in NN for p in (mods[k].weight_ih, mods[k].weight_hh, mods[k].bias_ih, mods[k].bias_hh)]

    def step(x, h, c, *p):
        a = rnn_cell(x, h, *p[0:4])
        b = gru_cell(x, a, *p[4:8])
        h2, c2 = lstm_cell(x, b, c, *p[8:12])
        return h2.pow(2).sum() + c2.mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, h, c, *params)
    torch.testing.assert_close(loss, step(x, h, c, *params))
    inputs = (x, h, c, *params)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(step(x, h, c, *params), inputs)):
        torch.testing.assert_close(a, b)


def test_torchscript():
    @torch.jit.script
    def scripted(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor,
                 w_hh: torch.Tensor) -> torch.Tensor:
        h1, c1 = torch.ops.pypeft.lstm_cell(x, h, c, w_ih, w_hh, None, None)
        return h1 + c1

    m = make_module("lstm", bias=False)
    x, h, c = make_state("lstm", 3, 7, 5)
    with torch.no_grad():
        h_ref, c_ref = m(x, (h, c))
        torch.testing.assert_close(scripted(x, h, c, m.weight_ih, m.weight_hh), h_ref + c_ref)


def test_double_backward_is_refused():
    m = make_module("gru")
    x, h, _ = make_state("gru", 3, 7, 5)
    y = gru_cell(x, h, m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


def _args(cell="gru", N=4, n_in=5, H=2):
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    return dict(x=torch.randn(N, n_in), h=torch.randn(N, H), c=torch.randn(N, H) if cell == "lstm" else None,
                w_ih=torch.randn(G * H, n_in), w_hh=torch.randn(G * H, H), b_ih=torch.randn(G * H),
                b_hh=torch.randn(G * H))


def _forward(cell, a):
    if cell == "lstm":
        return OPS[cell](a["x"], a["h"], a["c"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    return OPS[cell](a["x"], a["h"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])


BAD = {
    "x rank": ("gru", dict(x=torch.randn(2, 4, 5)), ValueError, "'x'", "3-D"),
    "x features": ("rnn", dict(x=torch.randn(4, 6)), ValueError, "'x'", "[4, 6]"),
    "h rows": ("gru", dict(h=torch.randn(3, 2)), ValueError, "'h'", "[3, 2]"),
    "c hidden": ("lstm", dict(c=torch.randn(4, 3)), ValueError, "'c'", "[4, 3]"),
    "w_hh rows": ("lstm", dict(w_hh=torch.randn(6, 2)), ValueError, "'w_hh'", "[6, 2]"),
    "b_hh size": ("rnn", dict(b_hh=torch.randn(3)), ValueError, "'b_hh'", "[3]"),
    "x dtype": ("gru", dict(x=torch.randn(4, 5, dtype=torch.float64)), TypeError, "'w_hh'", "Float"),
    "b_ih dtype": ("gru", dict(b_ih=torch.randn(6, dtype=torch.float64)), TypeError, "'b_ih'", "Double"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    cell, changes, exc, arg, got = BAD[case]
    a = _args(cell)
    a.update(changes)
    with pytest.raises(exc) as info:
        _forward(cell, a)
    msg = str(info.value)
    assert arg in msg and "expected" in msg and got in msg, msg


@pytest.mark.parametrize("cell, grad_c, c, match", [
    ("lstmx", None, None, "'cell': expected one of 'rnn', 'gru', 'lstm', got 'lstmx'"),
    ("gru", torch.randn(4, 2), None, "'grad_c': expected None for cell 'gru'"),
    ("gru", None, torch.randn(4, 2), "'c': expected None for cell 'gru'"),
    ("lstm", None, None, "'c': expected a tensor"),
])
def test_backward_bad_input(cell, grad_c, c, match):
    a = _args("gru" if cell != "lstm" else "lstm")
    with pytest.raises(ValueError, match=match):
        backward_op(torch.randn(4, 2), grad_c, a["x"], a["h"], c, a["w_ih"], a["w_hh"], None, None, cell, [True] * 7)


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
