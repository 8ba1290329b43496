"""pypeft::token_subset_layer_norm and token_subset_rms_norm: what is
particular to them (the op contract runs from tests/op_table.py in
test_op_contract.py). Random shapes against tests/reference.py's token_subset
semantics, forward bit for bit the plain norms and transformers'
LlamaRMSNorm (its gradients too), bfloat16, one saved copy of x's rows for
two norms, the rows output's gradient, and a backward of the backward
raising also when grad_y is a constant."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import reference as R
import saved_tensors
import token_subset_helpers as H
from conftest import DEVICES
from pypeft.ops import token_subset_layer_norm, token_subset_rms_norm

layer_norm_op = torch.ops.pypeft.token_subset_layer_norm.default
rms_norm_op = torch.ops.pypeft.token_subset_rms_norm.default

EPS = 1e-5


def layer_norm_pair(pos, eps=EPS):
    """(ours, reference) as functions of (x, weight, bias)."""
    def ours(x, w, b):
        return token_subset_layer_norm(x, w, b, eps, pos)

    def ref(x, w, b):
        return R.token_subset(lambda t: F.layer_norm(t, t.shape[-1:], w, b, eps), pos, x)

    return ours, ref


def rms_norm_pair(pos, eps=EPS):
    def ours(x, w):
        return token_subset_rms_norm(x, w, eps, pos)

    def ref(x, w):
        return R.token_subset(lambda t: R.rms_norm(t, w, eps), pos, x)

    return ours, ref


@settings(max_examples=25, deadline=None)
@given(shape=H.token_shapes(), d=st.integers(1, 12), with_w=st.booleans(), with_b=st.booleans())
def test_random_shapes(shape, d, with_w, with_b):
    B, T, k, seed = shape
    pos = H.positions(B, T, k, seed=seed)
    x, w, b = H.randn(B, T, d, seed=seed), H.randn(d, seed=1), H.randn(d, seed=2)
    H.assert_matches(*layer_norm_pair(pos), [x, w if with_w else None, b if with_b else None])
    H.assert_matches(*rms_norm_pair(pos), [x, w if with_w else None])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_bitwise_the_plain_norm_float32(device):
    x = H.randn(3, 9, 32, dtype=torch.float32, device=device, seed=1) * 4
    w, b = (H.randn(32, dtype=torch.float32, device=device, seed=s) for s in (2, 3))
    pos = H.positions(3, 9, 4, device=device)
    assert torch.equal(token_subset_layer_norm(x, w, b, EPS, pos), F.layer_norm(x, (32,), w, b, EPS))
    assert torch.equal(token_subset_layer_norm(x, None, None, EPS, pos), F.layer_norm(x, (32,), eps=EPS))
    llama = LlamaRMSNorm(32, eps=1e-6).to(device)
    with torch.no_grad():
        llama.weight.copy_(w)
    assert torch.equal(token_subset_rms_norm(x, w, 1e-6, pos), llama(x))


# dtype of x, dtype of the weight, tolerances for the gradients against Llama's.
LLAMA_DTYPES = {
    "float32": (torch.float32, torch.float32, dict(atol=1e-5, rtol=1e-5)),
    "bf16 x, fp32 weight": (torch.bfloat16, torch.float32, dict(atol=0.03, rtol=0.02)),
    "bf16 x, bf16 weight": (torch.bfloat16, torch.bfloat16, dict(atol=0.06, rtol=0.03)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", LLAMA_DTYPES, ids=list(LLAMA_DTYPES))
def test_rms_norm_is_llamas(device, dtypes):
    x_dtype, w_dtype, tol = LLAMA_DTYPES[dtypes]
    B, T, k, D = 2, 7, 3, 48
    pos = H.positions(B, T, k, seed=8, device=device)
    llama = LlamaRMSNorm(D, eps=1e-6).to(device=device, dtype=w_dtype)
    with torch.no_grad():
        llama.weight.copy_(H.randn(D, seed=9) * 0.5 + 1)
    x = (H.randn(B, T, D, seed=10) * 2).to(x_dtype).to(device)
    # Forward: bitwise, output dtype included (fp32 weight and bf16 x give fp32).
    y = token_subset_rms_norm(x, llama.weight.detach(), 1e-6, pos)
    y_llama = llama(x)
    assert y.dtype == y_llama.dtype and torch.equal(y, y_llama)

    # Backward: Llama under the token-subset semantics, in the same dtypes.
    def ours(x_, w_):
        return token_subset_rms_norm(x_, w_, 1e-6, pos)

    def theirs(x_, w_):
        return R.token_subset(lambda t: torch.func.functional_call(llama, {"weight": w_}, (t,)), pos, x_)

    args = H.leaves([x, llama.weight])
    _, got = H.outputs_and_grads(ours, args)
    _, want = H.outputs_and_grads(theirs, H.leaves(args))
    for name, a, b in zip(("x", "weight"), got, want):
        assert a.dtype == b.dtype, name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), atol=tol["atol"] * scale, rtol=tol["rtol"],
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_within_tolerance(device, w_dtype):
    B, T, k, D = 3, 8, 5, 64
    pos = H.positions(B, T, k, seed=11, device=device)
    x = (H.randn(B, T, D, seed=12) * 2 + 0.5).to(torch.bfloat16).to(device)
    w, b = ((H.randn(D, seed=s) * 0.5 + 1).to(w_dtype).to(device) for s in (13, 14))
    H.assert_matches(*layer_norm_pair(pos), [x, w, b], atol=0.02, rtol=0.02, atol_of_max=0.02)
    H.assert_matches(*rms_norm_pair(pos, eps=1e-6), [x, w], atol=0.02, rtol=0.02, atol_of_max=0.02)


def test_saves_only_the_selected_rows_once():
    B, T, k, D = 4, 16, 3, 32
    pos = H.positions(B, T, k, seed=2)
    x = H.randn(B, T, D, dtype=torch.float32).requires_grad_(True)
    w, b = (H.randn(D, dtype=torch.float32, seed=s).requires_grad_(True) for s in (1, 2))

    def two_norms_of_x(x):
        return token_subset_layer_norm(x, w, b, EPS, pos) + token_subset_rms_norm(x, w, EPS, pos)

    with saved_tensors.saved() as record:
        y = two_norms_of_x(x)
    saved = record.tensors
    H.assert_no_full_rows(saved, B, T)
    rows = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (B * k, D)}
    assert len(rows) == 1  # both norms read x: one copy of its rows
    y.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_rows_output_is_differentiable():
    pos, x, w = H.positions(2, 5, 3, seed=1), H.randn(2, 5, 4), H.randn(4, seed=2)
    H.assert_rows_output_differentiable(lambda x_: layer_norm_op(x_, w, None, EPS, pos), x, pos)
    H.assert_rows_output_differentiable(lambda x_: rms_norm_op(x_, w, EPS, pos), x, pos)


def test_no_double_backward_with_a_constant_grad_y():
    """y.sum(): grad_y is a constant, yet the gradient depends on x through the
    saved rows; differentiating it again must raise (the op contract checks
    the case where grad_y depends on x)."""
    pos = H.positions(1, 3, 2)
    x = H.randn(1, 3, 4).requires_grad_(True)
    (g,) = torch.autograd.grad(token_subset_layer_norm(x, None, None, EPS, pos).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()
