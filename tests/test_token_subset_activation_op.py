"""pypeft::token_subset_activation and token_subset_gated_activation against
tests/reference.py's token_subset semantics and the plain functions (and
transformers' activations), what they save, opcheck, gradcheck,
torch.compile, TorchScript and their argument checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.library import opcheck
from transformers.activations import ACT2FN

import reference as R
import token_subset_helpers as H
from conftest import DEVICES
from pypeft.ops import token_subset_activation, token_subset_gated_activation

op = torch.ops.pypeft.token_subset_activation.default
backward_op = torch.ops.pypeft.token_subset_activation_backward.default
gated_op = torch.ops.pypeft.token_subset_gated_activation.default
gated_backward_op = torch.ops.pypeft.token_subset_gated_activation_backward.default

PLAIN = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}
KINDS = list(PLAIN)


def activation_pair(kind, pos):
    """(ours, reference) as functions of x."""
    return (lambda x: token_subset_activation(x, kind, pos),
            lambda x: R.token_subset(PLAIN[kind], pos, x))


def gated_pair(kind, pos):
    """(ours, reference) as functions of (gate, up)."""
    return (lambda gate, up: token_subset_gated_activation(gate, up, kind, pos),
            lambda gate, up: R.token_subset(lambda g, u: PLAIN[kind](g) * u, pos, gate, up))


@pytest.mark.parametrize("shape", H.SHAPES, ids=H.SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, shape):
    B, T, k = shape
    pos = H.positions(B, T, k, seed=k)
    H.assert_matches(*activation_pair(kind, pos), [H.randn(B, T, 8, seed=1) * 3])
    H.assert_matches(*gated_pair(kind, pos), [H.randn(B, T, 8, seed=2) * 3, H.randn(B, T, 8, seed=3)])


@settings(max_examples=25, deadline=None)
@given(shape=H.token_shapes(), features=st.lists(st.integers(0, 5), max_size=2), kind=st.sampled_from(KINDS))
def test_random_shapes(shape, features, kind):
    B, T, k, seed = shape
    pos = H.positions(B, T, k, seed=seed)
    gate, up = H.randn(B, T, *features, seed=seed), H.randn(B, T, *features, seed=seed + 1)
    H.assert_matches(*activation_pair(kind, pos), [gate])
    H.assert_matches(*gated_pair(kind, pos), [gate, up])


@pytest.mark.parametrize("features", [(), (1,), (3, 4)], ids=["[B,T]", "[B,T,1]", "[B,T,3,4]"])
def test_any_trailing_dims(features):
    pos = H.positions(2, 5, 3, seed=4)
    H.assert_matches(*activation_pair("gelu", pos), [H.randn(2, 5, *features, seed=5)])
    H.assert_matches(*gated_pair("silu", pos), [H.randn(2, 5, *features, seed=6), H.randn(2, 5, *features, seed=7)])


def test_empty_batch_and_non_contiguous_input():
    pos = H.positions(0, 4, 2)
    H.assert_matches(*activation_pair("silu", pos), [H.randn(0, 4, 6)])
    H.assert_matches(*gated_pair("silu", pos), [H.randn(0, 4, 6), H.randn(0, 4, 6, seed=1)])
    pos = H.positions(3, 6, 2, seed=3)
    gate = H.randn(6, 8, 3, seed=4).permute(2, 0, 1)
    up = H.randn(3, 6, 16, seed=5)[..., ::2]
    assert not gate.is_contiguous() and not up.is_contiguous()
    H.assert_matches(*activation_pair("gelu_tanh", pos), [gate])
    H.assert_matches(*gated_pair("gelu", pos), [gate, up])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_bitwise_the_plain_function_float32(device, kind):
    x, up = (H.randn(3, 9, 40, dtype=torch.float32, device=device, seed=s) * 3 for s in (1, 2))
    pos = H.positions(3, 9, 4, device=device)
    assert torch.equal(token_subset_activation(x, kind, pos), PLAIN[kind](x))
    assert torch.equal(token_subset_gated_activation(x, up, kind, pos), PLAIN[kind](x) * up)


def test_transformers_activations():
    # Llama's MLP: act_fn(gate_proj(x)) * up_proj(x) with ACT2FN["silu"], bitwise.
    x, up = (H.randn(2, 7, 24, dtype=torch.float32, seed=s) * 3 for s in (1, 2))
    pos = H.positions(2, 7, 3)
    assert torch.equal(token_subset_gated_activation(x, up, "silu", pos), ACT2FN["silu"](x) * up)
    assert torch.equal(token_subset_activation(x, "gelu", pos), ACT2FN["gelu"](x))
    # GPT-2's gelu_new is the tanh approximation, written out: equal within float tolerance.
    torch.testing.assert_close(token_subset_activation(x, "gelu_tanh", pos), ACT2FN["gelu_new"](x),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_within_tolerance(device, kind):
    pos = H.positions(3, 8, 5, seed=11, device=device)
    gate, up = ((H.randn(3, 8, 64, seed=s) * 2).to(torch.bfloat16).to(device) for s in (12, 13))
    tol = dict(atol=0.02, rtol=0.02, atol_of_max=0.01)
    H.assert_matches(*activation_pair(kind, pos), [gate], **tol)
    H.assert_matches(*gated_pair(kind, pos), [gate, up], **tol)


def test_saves_only_the_selected_rows_once():
    B, T, k, D = 4, 16, 3, 32
    pos = H.positions(B, T, k, seed=2)
    x, u = (H.randn(B, T, D, dtype=torch.float32, seed=s).requires_grad_(True) for s in (1, 2))

    def mlp_like(x, u):
        return token_subset_activation(x, "gelu", pos) + token_subset_gated_activation(x, u, "silu", pos)

    saved, y = H.saved_tensors(mlp_like, x, u)
    H.assert_no_full_rows(saved, B, T)
    rows = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (B * k, D)}
    assert len(rows) == 2  # x's rows once (read by both ops), u's rows
    y.sum().backward()
    assert x.grad is not None and u.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(device, kind):
    pos = H.positions(3, 5, 2, device=device)
    gate, up = (H.randn(3, 5, 6, dtype=torch.float32, device=device, seed=s).requires_grad_(True)
                for s in (1, 2))
    opcheck(op, (gate, kind, pos))
    opcheck(gated_op, (gate, up, kind, pos))
    gy = H.randn(3, 5, 6, dtype=torch.float32, device=device, seed=3)
    gate_rows, up_rows = (H.randn(6, 6, dtype=torch.float32, device=device, seed=s) for s in (4, 5))
    opcheck(backward_op, (gy, gate_rows, kind, pos))
    for mask in ([True, True], [True, False], [False, True]):
        opcheck(gated_backward_op, (gy, gate_rows, up_rows, kind, pos, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    B, T, k, D = 2, 5, 3, 4
    pos = H.positions(B, T, k, seed=6)
    gate, up = H.randn(B, T, D, seed=7), H.randn(B, T, D, seed=8)
    fn, (g,) = H.on_selected_tokens(lambda x_: token_subset_activation(x_, kind, pos), pos, gate)
    assert torch.autograd.gradcheck(fn, (g.requires_grad_(True),))
    fn, sel = H.on_selected_tokens(lambda g_, u_: token_subset_gated_activation(g_, u_, kind, pos), pos, gate, up)
    assert torch.autograd.gradcheck(fn, [s.requires_grad_(True) for s in sel])


def _mlp_step(gate, up, pos):
    h = token_subset_gated_activation(gate, up, "silu", pos)
    return (token_subset_activation(h, "gelu_tanh", pos) * h).pow(2).mean()


def _check_compiled(backend):
    pos = H.positions(2, 6, 3, seed=1)
    args = [H.randn(2, 6, 16, dtype=torch.float32, seed=s).requires_grad_(True) for s in (2, 3)]
    H.assert_compiled_matches_eager(_mlp_step, args, pos, backend=backend)


def test_compile_fullgraph_aot_eager():
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled("inductor")


def test_torchscript():
    @torch.jit.script
    def scripted(gate: torch.Tensor, up: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = torch.ops.pypeft.token_subset_gated_activation(gate, up, "silu", pos)[0]
        return torch.ops.pypeft.token_subset_activation(h, "relu", pos)[0]

    pos = H.positions(2, 4, 2)
    gate, up = H.randn(2, 4, 8), H.randn(2, 4, 8, seed=1)
    torch.testing.assert_close(scripted(gate, up, pos), F.relu(F.silu(gate) * up))


def test_rows_outputs_are_differentiable():
    pos, x, up = H.positions(2, 5, 3, seed=1), H.randn(2, 5, 4), H.randn(2, 5, 4, seed=2)
    H.assert_rows_output_differentiable(lambda x_: op(x_, "silu", pos), x, pos)
    H.assert_rows_output_differentiable(lambda g_: gated_op(g_, up, "gelu", pos), x, pos, which=1)
    H.assert_rows_output_differentiable(lambda u_: gated_op(x, u_, "gelu", pos), up, pos, which=2)


def test_no_double_backward():
    pos = H.positions(1, 3, 2)
    x = H.randn(1, 3, 4).requires_grad_(True)
    (g,) = torch.autograd.grad(token_subset_activation(x, "silu", pos).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


@pytest.mark.parametrize("case", H.BAD_POSITIONS, ids=list(H.BAD_POSITIONS))
def test_bad_positions(case):
    gate, up = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    H.check_bad_positions(lambda pos: token_subset_activation(gate, "gelu", pos), case)
    H.check_bad_positions(lambda pos: token_subset_gated_activation(gate, up, "silu", pos), case)


def test_bad_kind_lists_the_kinds():
    x, pos = torch.randn(2, 5, 4), torch.tensor([[0, 1], [2, 3]])
    rows = torch.randn(4, 4)
    calls = {
        "forward": lambda: op(x, "swish", pos),
        "gated": lambda: gated_op(x, x, "swish", pos),
        "backward": lambda: backward_op(x, rows, "swish", pos),
        "gated backward": lambda: gated_backward_op(x, rows, rows, "swish", pos, [True, True]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "'kind'" in msg and "'swish'" in msg, (name, msg)
        assert all(f"'{k}'" in msg for k in KINDS), (name, msg)


BAD = {
    "int dtype": (dict(gate=torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "'gate'", "Long"),
    "up shape": (dict(up=torch.randn(2, 5, 3)), ValueError, "'up'", "[2, 5, 3]"),
    "up dtype": (dict(up=torch.randn(2, 5, 4, dtype=torch.float64)), TypeError, "'up'", "Double"),
    "gate 1-D": (dict(gate=torch.randn(5)), ValueError, "'gate'", "[5]"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    changes, exc, arg, got = BAD[case]
    args = dict(gate=torch.randn(2, 5, 4), up=torch.randn(2, 5, 4)) | changes
    with pytest.raises(exc) as info:
        gated_op(args["gate"], args["up"], "silu", torch.tensor([[0, 1], [2, 3]]))
    msg = str(info.value)
    assert arg in msg and "expected" in msg and got in msg, msg


def test_backward_checks_the_rows():
    gy, pos = torch.randn(2, 5, 4), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"'x_rows': expected shape \[4, 4\]"):
        backward_op(gy, torch.randn(4, 3), "gelu", pos)
    with pytest.raises(ValueError, match=r"'up_rows': expected shape \[4, 4\]"):
        gated_backward_op(gy, torch.randn(4, 4), torch.randn(2, 4), "gelu", pos, [True, True])
    with pytest.raises(TypeError, match="'x_rows'"):
        backward_op(gy, torch.randn(4, 4, dtype=torch.float64), "gelu", pos)
