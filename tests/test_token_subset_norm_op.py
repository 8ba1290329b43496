"""pypeft::token_subset_layer_norm and token_subset_rms_norm against
tests/reference.py's token_subset semantics and transformers' LlamaRMSNorm,
what they save, opcheck, gradcheck, torch.compile, TorchScript and their
argument checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.library import opcheck
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import reference as R
import token_subset_helpers as H
from conftest import DEVICES
from pypeft.ops import token_subset_layer_norm, token_subset_rms_norm

layer_norm_op = torch.ops.pypeft.token_subset_layer_norm.default
layer_norm_backward_op = torch.ops.pypeft.token_subset_layer_norm_backward.default
rms_norm_op = torch.ops.pypeft.token_subset_rms_norm.default
rms_norm_backward_op = torch.ops.pypeft.token_subset_rms_norm_backward.default

EPS = 1e-5


def rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward as a function, except that float64 stays float64
    (the op's documented choice, so that float64 comparisons are exact)."""
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) if weight is None else weight * h.to(x.dtype)


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
        return R.token_subset(lambda t: rms_norm(t, w, eps), pos, x)

    return ours, ref


AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True), "none": (False, False)}


@pytest.mark.parametrize("affine", AFFINE, ids=list(AFFINE))
@pytest.mark.parametrize("shape", H.SHAPES, ids=H.SHAPE_IDS)
def test_layer_norm_matches_reference(shape, affine):
    B, T, k = shape
    with_w, with_b = AFFINE[affine]
    pos = H.positions(B, T, k, seed=k)
    x = H.randn(B, T, 8, seed=1) * 3 + 1
    w = H.randn(8, seed=2) if with_w else None
    b = H.randn(8, seed=3) if with_b else None
    H.assert_matches(*layer_norm_pair(pos), [x, w, b])


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape", H.SHAPES, ids=H.SHAPE_IDS)
def test_rms_norm_matches_reference(shape, with_weight):
    B, T, k = shape
    pos = H.positions(B, T, k, seed=k)
    x = H.randn(B, T, 8, seed=1) * 3 + 1
    w = H.randn(8, seed=2) if with_weight else None
    H.assert_matches(*rms_norm_pair(pos), [x, w])


@settings(max_examples=25, deadline=None)
@given(shape=H.token_shapes(), d=st.integers(1, 12), with_w=st.booleans(), with_b=st.booleans())
def test_random_shapes(shape, d, with_w, with_b):
    B, T, k, seed = shape
    pos = H.positions(B, T, k, seed=seed)
    x, w, b = H.randn(B, T, d, seed=seed), H.randn(d, seed=1), H.randn(d, seed=2)
    H.assert_matches(*layer_norm_pair(pos), [x, w if with_w else None, b if with_b else None])
    H.assert_matches(*rms_norm_pair(pos), [x, w if with_w else None])


def test_heads_dim_normalised_over_the_last_dim_only():
    # [B, T, heads, D] as in per-head q/k norms: rows of F = heads * D features.
    pos = H.positions(2, 6, 3, seed=4)
    x = H.randn(2, 6, 3, 4, seed=5)
    H.assert_matches(*layer_norm_pair(pos), [x, H.randn(4, seed=6), H.randn(4, seed=7)])
    H.assert_matches(*rms_norm_pair(pos), [x, H.randn(4, seed=6)])


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


def test_empty_batch_and_non_contiguous_x():
    pos = H.positions(0, 5, 2)
    x = H.randn(0, 5, 8)
    H.assert_matches(*layer_norm_pair(pos), [x, H.randn(8), None])
    H.assert_matches(*rms_norm_pair(pos), [x, None])
    pos = H.positions(3, 6, 2, seed=3)
    x = H.randn(6, 8, 3, seed=4).permute(2, 0, 1)  # [3, 6, 8], last dim strided
    assert not x.is_contiguous()
    H.assert_matches(*layer_norm_pair(pos), [x, H.randn(8), H.randn(8, seed=1)])
    H.assert_matches(*rms_norm_pair(pos), [x, H.randn(8)])


def test_saves_only_the_selected_rows_once():
    B, T, k, D = 4, 16, 3, 32
    pos = H.positions(B, T, k, seed=2)
    x = H.randn(B, T, D, dtype=torch.float32).requires_grad_(True)
    w, b = (H.randn(D, dtype=torch.float32, seed=s).requires_grad_(True) for s in (1, 2))

    def two_norms_of_x(x):
        return token_subset_layer_norm(x, w, b, EPS, pos) + token_subset_rms_norm(x, w, EPS, pos)

    saved, y = H.saved_tensors(two_norms_of_x, x)
    H.assert_no_full_rows(saved, B, T)
    rows = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (B * k, D)}
    assert len(rows) == 1  # both norms read x: one copy of its rows
    y.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", AFFINE, ids=list(AFFINE))
def test_opcheck(device, affine):
    with_w, with_b = AFFINE[affine]
    pos = H.positions(3, 5, 2, device=device)
    x = H.randn(3, 5, 6, dtype=torch.float32, device=device).requires_grad_(True)
    w = H.randn(6, dtype=torch.float32, device=device, seed=1).requires_grad_(True) if with_w else None
    b = H.randn(6, dtype=torch.float32, device=device, seed=2).requires_grad_(True) if with_b else None
    opcheck(layer_norm_op, (x, w, b, EPS, pos))
    opcheck(rms_norm_op, (x, w, EPS, pos))
    gy = H.randn(3, 5, 6, dtype=torch.float32, device=device, seed=3)
    x_rows = H.randn(6, 6, dtype=torch.float32, device=device, seed=4)
    # Backward ops take nothing that requires grad: their own backward raises.
    w, b = (None if t is None else t.detach() for t in (w, b))
    for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, True]):
        opcheck(layer_norm_backward_op, (gy, x_rows, w, b, EPS, pos, mask))
        opcheck(rms_norm_backward_op, (gy, x_rows, w, EPS, pos, mask[:2]))


def test_gradcheck_float64():
    B, T, k, D = 2, 5, 3, 4
    pos = H.positions(B, T, k, seed=6)
    x = H.randn(B, T, D, seed=7)
    w, b = (H.randn(D, seed=s).requires_grad_(True) for s in (8, 9))
    fn, (x_sel,) = H.on_selected_tokens(lambda x_, w_, b_: token_subset_layer_norm(x_, w_, b_, EPS, pos), pos, x)
    assert torch.autograd.gradcheck(fn, (x_sel.requires_grad_(True), w, b))
    fn, (x_sel,) = H.on_selected_tokens(lambda x_, w_: token_subset_rms_norm(x_, w_, EPS, pos), pos, x)
    assert torch.autograd.gradcheck(fn, (x_sel.requires_grad_(True), w))
    # With every token selected the op is the plain norm: gradcheck it whole.
    every = H.positions(B, T, T, seed=1)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: token_subset_layer_norm(x_, w_, b_, EPS, every),
                                    (x.clone().requires_grad_(True), w, b))
    assert torch.autograd.gradcheck(lambda x_, w_: token_subset_rms_norm(x_, w_, EPS, every),
                                    (x.clone().requires_grad_(True), w))


def _norm_step(x, w, b, pos):
    return (token_subset_layer_norm(x, w, b, EPS, pos) * token_subset_rms_norm(x, w, EPS, pos)).pow(2).mean()


def _check_compiled(backend):
    pos = H.positions(2, 6, 3, seed=1)
    args = [H.randn(2, 6, 16, dtype=torch.float32, seed=2).requires_grad_(True),
            H.randn(16, dtype=torch.float32, seed=3).requires_grad_(True),
            H.randn(16, dtype=torch.float32, seed=4).requires_grad_(True)]
    H.assert_compiled_matches_eager(_norm_step, args, pos, backend=backend)


def test_compile_fullgraph_aot_eager():
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled("inductor")


def test_torchscript():
    @torch.jit.script
    def scripted(x: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y = torch.ops.pypeft.token_subset_layer_norm(x, w, None, 1e-5, pos)[0]
        return y + torch.ops.pypeft.token_subset_rms_norm(x, w, 1e-5, pos)[0]

    pos = H.positions(2, 4, 2)
    x, w = H.randn(2, 4, 8), H.randn(8, seed=1)
    torch.testing.assert_close(scripted(x, w, pos), F.layer_norm(x, (8,), w, None, EPS) + rms_norm(x, w, EPS))


def test_rows_output_is_differentiable():
    pos, x, w = H.positions(2, 5, 3, seed=1), H.randn(2, 5, 4), H.randn(4, seed=2)
    H.assert_rows_output_differentiable(lambda x_: layer_norm_op(x_, w, None, EPS, pos), x, pos)
    H.assert_rows_output_differentiable(lambda x_: rms_norm_op(x_, w, EPS, pos), x, pos)


def test_no_double_backward():
    pos = H.positions(1, 3, 2)
    x = H.randn(1, 3, 4).requires_grad_(True)
    for loss in (lambda y: y.sum(), lambda y: y.pow(3).sum()):  # grad_y constant, or not
        (g,) = torch.autograd.grad(loss(token_subset_layer_norm(x, None, None, EPS, pos)), x, create_graph=True)
        with pytest.raises(RuntimeError, match="second-order"):
            g.sum().backward()


@pytest.mark.parametrize("case", H.BAD_POSITIONS, ids=list(H.BAD_POSITIONS))
def test_bad_positions(case):
    x, w = H.randn(2, 5, 4, dtype=torch.float32), H.randn(4, dtype=torch.float32)
    H.check_bad_positions(lambda pos: token_subset_layer_norm(x, w, None, EPS, pos), case)
    H.check_bad_positions(lambda pos: token_subset_rms_norm(x, w, EPS, pos), case)


f32 = dict(dtype=torch.float32)
BAD = {
    "x 2-D": (dict(x=torch.randn(2, 5)), ValueError, "'x'", "[B, T, ..., D]"),
    "x int": (dict(x=torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "'x'", "Long"),
    "weight size": (dict(weight=torch.randn(5)), ValueError, "'weight'", "size 4 in dim 0"),
    "weight 2-D": (dict(weight=torch.randn(1, 4)), ValueError, "'weight'", "1-D"),
    "weight dtype": (dict(weight=torch.randn(4, dtype=torch.float64)), TypeError, "'weight'", "Double"),
    "fp32 weight beside fp64 x": (dict(x=torch.randn(2, 5, 4, dtype=torch.float64)), TypeError, "'weight'",
                                  "Float"),
    "eps inf": (dict(eps=float("inf")), ValueError, "'eps'", "inf"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_bad_input_names_the_argument(norm, case):
    changes, exc, arg, got = BAD[case]
    args = dict(x=torch.randn(2, 5, 4), weight=torch.randn(4), eps=EPS, positions=torch.tensor([[0, 1], [2, 3]]))
    args.update(changes)
    with pytest.raises(exc) as info:
        if norm == "layer":
            layer_norm_op(args["x"], args["weight"], None, args["eps"], args["positions"])
        else:
            rms_norm_op(args["x"], args["weight"], args["eps"], args["positions"])
    msg = str(info.value)
    assert arg in msg and "expected" in msg and got in msg, msg


def test_bad_bias_and_backward_rows():
    x, pos = torch.randn(2, 5, 4), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="'bias'.*dtype Float"):
        layer_norm_op(x.bfloat16(), torch.randn(4), torch.randn(4).bfloat16(), EPS, pos)
    with pytest.raises(ValueError, match=r"'x_rows': expected shape \[4, 4\]"):
        layer_norm_backward_op(x, torch.randn(3, 4), None, None, EPS, pos, [True, False, False])
    with pytest.raises(ValueError, match=r"'x_rows': expected shape \[4, 4\]"):
        rms_norm_backward_op(x, torch.randn(4, 5), None, EPS, pos, [True, False])
