"""pypeft::recurrent_scan against a loop of torch.nn cells (tests/reference.py):
forward and every gradient, shapes from empty to several steps, non-contiguous
inputs, gradcheck, bfloat16, the sparse-row backward, what it saves, opcheck,
torch.compile, TorchScript and its argument checks."""

import pytest
import torch
from torch.library import opcheck

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft.ops import recurrent_scan

op = torch.ops.pypeft.recurrent_scan.default
backward_op = torch.ops.pypeft.recurrent_scan_backward.default

GATES = {"rnn": 1, "gru": 3, "lstm": 4}
NAMES = ("xs", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")  # the output-mask order


def make_inputs(cell, L=5, N=6, n_in=7, H=4, dtype=torch.float64, device="cpu", bias="both", seed=0):
    """The op's arguments by name; bias: "both", "none" or "ih" (b_ih only)."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    return dict(xs=rnd(L, N, n_in), h0=rnd(N, H), c0=rnd(N, H) if cell == "lstm" else None,
                w_ih=rnd(G * H, n_in, scale=0.5), w_hh=rnd(G * H, H, scale=0.5),
                b_ih=rnd(G * H) if bias in ("both", "ih") else None, b_hh=rnd(G * H) if bias == "both" else None)


def run(inputs, cell):
    i = inputs
    return recurrent_scan(i["xs"], i["h0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell=cell, c0=i["c0"])


def run_reference(inputs, cell):
    i = inputs
    return R.recurrent_scan(i["xs"], i["h0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell=cell, c0=i["c0"])


def leaves(inputs, dtype=None):
    return {k: (v.detach().to(dtype or v.dtype).clone().requires_grad_() if v is not None else None)
            for k, v in inputs.items()}


def grads(hs, inputs, grad_hs):
    names = [k for k in NAMES if inputs[k] is not None]
    if not hs.requires_grad:  # the reference's empty loop (L = 0): nothing reaches the inputs
        return {k: torch.zeros_like(inputs[k]) for k in names}
    got = torch.autograd.grad(hs, [inputs[k] for k in names], grad_hs, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(inputs[k])) for k, g in zip(names, got)}


def check_against_reference(inputs, cell, grad_hs=None, atol=1e-10, rtol=1e-10):
    ours, ref = leaves(inputs), leaves(inputs, torch.float64)
    hs, hs_ref = run(ours, cell), run_reference(ref, cell)
    assert hs.shape == hs_ref.shape and hs.dtype == inputs["xs"].dtype
    torch.testing.assert_close(hs.double(), hs_ref, atol=atol, rtol=rtol)
    if grad_hs is None:
        grad_hs = torch.randn(hs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_hs = grad_hs.to(hs.device)
    got, want = grads(hs, ours, grad_hs.to(hs.dtype)), grads(hs_ref, ref, grad_hs)
    for name in want:
        assert got[name].shape == ours[name].shape and got[name].dtype == ours[name].dtype, name
        torch.testing.assert_close(got[name].double(), want[name], atol=atol, rtol=rtol,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("bias", ["both", "none", "ih"])
@pytest.mark.parametrize("L, N", [(0, 3), (1, 1), (1, 4), (5, 0), (5, 1), (6, 5)])
def test_matches_nn_cell_loop(device, cell, bias, L, N):
    check_against_reference(make_inputs(cell, L=L, N=N, device=device, bias=bias), cell)


@pytest.mark.parametrize("cell", list(GATES))
def test_non_contiguous_inputs(cell):
    i = make_inputs(cell, L=4, N=5, n_in=6, H=3)
    G = GATES[cell]
    # The same values, laid out with other strides.
    i["xs"] = i["xs"].transpose(0, 1).contiguous().transpose(0, 1)
    i["h0"] = i["h0"].t().contiguous().t()
    if i["c0"] is not None:
        i["c0"] = torch.stack([i["c0"], i["c0"]], 2)[..., 0]
    i["w_ih"] = i["w_ih"].t().contiguous().t()
    i["w_hh"] = torch.cat([i["w_hh"], i["w_hh"]], 1)[:, :3]
    i["b_ih"] = torch.stack([i["b_ih"], i["b_ih"]], 1)[:, 1]
    assert not (i["xs"].is_contiguous() or i["h0"].is_contiguous() or i["w_ih"].is_contiguous()
                or i["w_hh"].is_contiguous() or i["b_ih"].is_contiguous())
    assert i["w_hh"].shape == (G * 3, 3)
    check_against_reference(i, cell)


@pytest.mark.parametrize("cell", list(GATES))
def test_gradcheck_float64(cell):
    i = make_inputs(cell, L=3, N=2, n_in=3, H=2)
    names = [k for k in NAMES if i[k] is not None]

    def fn(*args):
        return run(dict.fromkeys(NAMES) | dict(zip(names, args)), cell)

    assert torch.autograd.gradcheck(fn, [i[k].requires_grad_() for k in names])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(GATES))
def test_bfloat16_close_to_float32(device, cell):
    i = make_inputs(cell, L=6, N=16, n_in=32, H=16, dtype=torch.float32, device=device)
    low = {k: (v.to(torch.bfloat16) if v is not None else None) for k, v in i.items()}
    ours32, ours16 = leaves(i), leaves(low)
    hs32, hs16 = run(ours32, cell), run(ours16, cell)
    assert hs16.dtype == torch.bfloat16
    torch.testing.assert_close(hs16.float(), hs32, atol=0.05, rtol=0.05)
    g = torch.randn(hs32.shape, generator=torch.Generator().manual_seed(2)).to(device)
    got, want = grads(hs16, ours16, g.bfloat16()), grads(hs32, ours32, g)
    for name in want:
        assert got[name].dtype == torch.bfloat16
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name].float(), want[name], atol=0.04 * scale + 0.02, rtol=0.05,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("cell", list(GATES))
def test_sparse_rows_equal_dense_and_reference(cell):
    """Gradient on a few rows only (a classifier reading one token per
    sequence): the backward skips the others, with the same result."""
    i = make_inputs(cell, L=5, N=12, n_in=6, H=4)
    rows = torch.tensor([1, 7, 8])
    g = torch.zeros(5, 12, 4, dtype=torch.float64)
    g[:, rows] = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g[:4, 8] = 0  # a row with gradient at one step only
    check_against_reference(i, cell, grad_hs=g)

    hs = op(i["xs"], i["h0"], i["c0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell)
    mask = [True, True, cell == "lstm", True, True, True, True]
    sparse = backward_op(g, i["xs"], hs, i["h0"], i["c0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell, mask)
    # The same rows alone, where every row is active (no gather).
    sub = {k: (v[:, rows] if k == "xs" else v[rows] if k in ("h0", "c0") else v) if v is not None else None
           for k, v in i.items()}
    dense = backward_op(g[:, rows], sub["xs"], hs[:, rows], sub["h0"], sub["c0"], sub["w_ih"], sub["w_hh"],
                        sub["b_ih"], sub["b_hh"], cell, mask)
    for name, s, d in zip(NAMES, sparse, dense):
        if d is None:
            assert s is None, name
            continue
        if name == "xs":
            torch.testing.assert_close(s[:, rows], d, atol=1e-14, rtol=1e-12)
            assert not s[:, [r for r in range(12) if r not in rows]].any(), name
        elif name in ("h0", "c0"):
            torch.testing.assert_close(s[rows], d, atol=1e-14, rtol=1e-12)
            assert not s[[r for r in range(12) if r not in rows]].any(), name
        else:
            torch.testing.assert_close(s, d, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_zero_gradient_gives_zero_gradients(cell):
    i = make_inputs(cell, L=3, N=4)
    hs = op(i["xs"], i["h0"], i["c0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell)
    out = backward_op(torch.zeros_like(hs), i["xs"], hs, i["h0"], i["c0"], i["w_ih"], i["w_hh"], i["b_ih"],
                      i["b_hh"], cell, [True] * 7)
    for name, t, like in zip(NAMES, out, (i[k] for k in NAMES)):
        if like is None:
            assert t is None, name
        else:
            assert t.shape == like.shape and not t.any(), name


def test_output_mask_leaves_the_rest_undefined():
    i = make_inputs("lstm", L=3, N=4)
    hs = op(i["xs"], i["h0"], i["c0"], i["w_ih"], i["w_hh"], None, i["b_hh"], "lstm")
    out = backward_op(torch.ones_like(hs), i["xs"], hs, i["h0"], i["c0"], i["w_ih"], i["w_hh"], None, i["b_hh"],
                      "lstm", [False, True, False, False, True, True, False])
    assert [t is not None for t in out] == [False, True, False, False, True, False, False]


@pytest.mark.parametrize("cell", list(GATES))
def test_saves_no_gate_sized_tensor(cell):
    L, N, n_in, H = 4, 8, 6, 5
    i = leaves(make_inputs(cell, L=L, N=N, n_in=n_in, H=H))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        hs = run(i, cell)
    shapes = sorted(tuple(t.shape) for t in saved)
    want = [(L, N, n_in), (L, N, H), (N, H)] + ([(N, H)] if cell == "lstm" else [])
    want += [tuple(i[k].shape) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    assert shapes == sorted(want)
    G = GATES[cell]
    if G > 1:
        assert all(t.numel() != L * N * G * H for t in saved)
    assert any(t is hs or t.data_ptr() == hs.data_ptr() for t in saved)  # hs itself, not a copy
    hs.sum().backward()
    assert all(i[k].grad is not None for k in NAMES if i[k] is not None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(GATES))
def test_opcheck(device, cell):
    i = make_inputs(cell, L=3, N=4, n_in=5, H=3, dtype=torch.float32, device=device)
    for k in NAMES:
        if i[k] is not None:
            i[k].requires_grad_(True)
    opcheck(op, (i["xs"], i["h0"], i["c0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell))
    d = {k: (v.detach() if v is not None else None) for k, v in i.items()}
    hs = op(d["xs"], d["h0"], d["c0"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], cell)
    g = torch.randn_like(hs)
    g[:, 1] = 0
    for mask in ([True] * 7, [False, True, False, True, False, False, True]):
        opcheck(backward_op, (g, d["xs"], hs, d["h0"], d["c0"], d["w_ih"], d["w_hh"], d["b_ih"], None, cell, mask))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    i = leaves(make_inputs("gru", L=4, N=6, dtype=torch.float32))
    c = leaves(make_inputs("lstm", L=4, N=6, dtype=torch.float32, bias="none", seed=1))

    def step(xs, h0, w_ih, w_hh, b_ih, b_hh, xs2, h2, c2, v_ih, v_hh):
        a = recurrent_scan(xs, h0, w_ih, w_hh, b_ih, b_hh, cell="gru")
        b = recurrent_scan(xs2, h2, v_ih, v_hh, cell="lstm", c0=c2)
        return a[-1].pow(2).mean() + b.sin().sum()

    args = (i["xs"], i["h0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], c["xs"], c["h0"], c["c0"], c["w_ih"],
            c["w_hh"])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(*args)
    torch.testing.assert_close(loss, step(*args))
    got = torch.autograd.grad(loss, args)
    want = torch.autograd.grad(step(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_compile_dynamic_rows():
    torch._dynamo.reset()
    f = torch.compile(lambda xs, h0, w_ih, w_hh: recurrent_scan(xs, h0, w_ih, w_hh, cell="rnn").sum(),
                      backend="aot_eager", fullgraph=True, dynamic=True)
    for N in (3, 5):
        i = leaves(make_inputs("rnn", L=2, N=N, bias="none", dtype=torch.float32))
        loss = f(i["xs"], i["h0"], i["w_ih"], i["w_hh"])
        loss.backward()
        torch.testing.assert_close(loss, run_reference(i, "rnn").sum())
        assert i["w_hh"].grad is not None


def test_torchscript():
    @torch.jit.script
    def scripted(xs: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                 b_ih: torch.Tensor) -> torch.Tensor:
        return torch.ops.pypeft.recurrent_scan(xs, h0, None, w_ih, w_hh, b_ih, None, "gru")

    i = make_inputs("gru", bias="ih")
    torch.testing.assert_close(scripted(i["xs"], i["h0"], i["w_ih"], i["w_hh"], i["b_ih"]), run_reference(i, "gru"))


def test_double_backward_is_refused():
    i = leaves(make_inputs("gru", L=2, N=3))
    hs = run(i, "gru")
    (g,) = torch.autograd.grad(hs.pow(2).sum(), i["w_hh"], create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


def _bad(cell="gru", **changes):
    i = make_inputs(cell, L=3, N=4, n_in=5, H=2, dtype=torch.float32)
    i.update(changes)
    return i


BAD = {
    "unknown cell": (dict(), "lstmx", ValueError, "'cell'", "'rnn', 'gru', 'lstm'"),
    "xs rank": (dict(xs=torch.randn(4, 5)), "gru", ValueError, "'xs'", "3-D"),
    "xs features": (dict(xs=torch.randn(3, 4, 6)), "gru", ValueError, "'xs'", "[3, 4, 6]"),
    "h0 rows": (dict(h0=torch.randn(5, 2)), "gru", ValueError, "'h0'", "[5, 2]"),
    "h0 hidden": (dict(h0=torch.randn(4, 3)), "gru", ValueError, "'h0'", "[4, 3]"),
    "h0 rank": (dict(h0=torch.randn(4)), "gru", ValueError, "'h0'", "1-D"),
    "w_hh not G·H rows": (dict(w_hh=torch.randn(4, 2)), "gru", ValueError, "'w_hh'", "[4, 2]"),
    "w_ih rows": (dict(w_ih=torch.randn(4, 5)), "gru", ValueError, "'w_ih'", "[4, 5]"),
    "b_ih size": (dict(b_ih=torch.randn(5)), "gru", ValueError, "'b_ih'", "[5]"),
    "b_hh rank": (dict(b_hh=torch.randn(6, 1)), "gru", ValueError, "'b_hh'", "2-D"),
    "c0 for gru": (dict(c0=torch.randn(4, 2)), "gru", ValueError, "'c0'", "a tensor"),
    "c0 missing for lstm": (dict(c0=None, w_ih=torch.randn(8, 5), w_hh=torch.randn(8, 2), b_ih=None, b_hh=None),
                            "lstm", ValueError, "'c0'", "None"),
    "h0 dtype": (dict(h0=torch.randn(4, 2, dtype=torch.float64)), "gru", TypeError, "'h0'", "Double"),
    "w_hh dtype": (dict(w_hh=torch.randn(6, 2, dtype=torch.bfloat16)), "gru", TypeError, "'w_hh'", "BFloat16"),
    "integer xs": (dict(xs=torch.ones(3, 4, 5, dtype=torch.int64)), "gru", TypeError, "'xs'", "Long"),
    "float16 on cpu": (dict(xs=torch.ones(3, 4, 5, dtype=torch.float16)), "gru", TypeError, "'xs'", "Half"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    changes, cell, exc, arg, got = BAD[case]
    i = _bad(cell if cell != "lstmx" else "gru", **changes)
    with pytest.raises(exc) as info:
        op(i["xs"], i["h0"], i["c0"], i["w_ih"], i["w_hh"], i["b_ih"], i["b_hh"], cell)
    msg = str(info.value)
    assert arg in msg and "expected" in msg and got in msg, msg


@pytest.mark.parametrize("which, shape", [("grad_hs", (3, 4, 3)), ("hs", (2, 4, 2))])
def test_backward_checks_sequence_shapes(which, shape):
    i = _bad()
    args = dict(grad_hs=torch.ones(3, 4, 2), hs=torch.ones(3, 4, 2))
    args[which] = torch.ones(shape)
    with pytest.raises(ValueError, match=f"'{which}': expected shape \\[3, 4, 2\\]"):
        backward_op(args["grad_hs"], i["xs"], args["hs"], i["h0"], None, i["w_ih"], i["w_hh"], i["b_ih"],
                    i["b_hh"], "gru", [True] * 7)


@requires_cuda
def test_device_mismatch_names_the_argument():
    i = _bad()
    with pytest.raises(ValueError, match="'h0'.*expected a tensor on cuda"):
        op(i["xs"].cuda(), i["h0"], None, i["w_ih"].cuda(), i["w_hh"].cuda(), None, None, "gru")


@requires_cuda
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_cuda_matches_cpu(cell, dtype):
    i = make_inputs(cell, L=7, N=300, n_in=24, H=33)
    g = torch.randn(7, 300, 33, dtype=torch.float64)
    g[:, ::3] = 0
    cpu, gpu = leaves(i), leaves({k: (v.to(dtype).cuda() if v is not None else None) for k, v in i.items()})
    hs_cpu, hs_gpu = run(cpu, cell), run(gpu, cell)
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(hs_gpu.double().cpu(), hs_cpu, atol=tol, rtol=tol)
    got, want = grads(hs_gpu, gpu, g.to(dtype).cuda()), grads(hs_cpu, cpu, g)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name].double().cpu(), want[name], atol=tol * (1 + scale), rtol=tol * 3,
                                   msg=lambda m: f"grad {name}: {m}")
