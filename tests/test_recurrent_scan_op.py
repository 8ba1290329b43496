"""pypeft::recurrent_scan: what is particular to it (the op contract, against
a loop of torch.nn cells in tests/reference.py, runs from tests/op_table.py in
test_op_contract.py). Every cell and bias combination over shapes from empty
to several steps, bfloat16, the sparse-row backward, zero and partial
gradients, and CUDA against the CPU."""

import pytest
import torch

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
