"""pypeft::token_subset_activation and token_subset_gated_activation: what is
particular to them (the op contract runs from tests/op_table.py in
test_op_contract.py). Random shapes against tests/reference.py's
token_subset semantics, forward bit for bit the plain functions and
transformers' activations, bfloat16, one saved copy of a tensor's rows for
two ops, and the rows outputs' gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers.activations import ACT2FN

import reference as R
import saved_tensors
import token_subset_helpers as H
from conftest import DEVICES
from pypeft.ops import token_subset_activation, token_subset_gated_activation

op = torch.ops.pypeft.token_subset_activation.default
gated_op = torch.ops.pypeft.token_subset_gated_activation.default

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


@settings(max_examples=25, deadline=None)
@given(shape=H.token_shapes(), features=st.lists(st.integers(0, 5), max_size=2), kind=st.sampled_from(KINDS))
def test_random_shapes(shape, features, kind):
    B, T, k, seed = shape
    pos = H.positions(B, T, k, seed=seed)
    gate, up = H.randn(B, T, *features, seed=seed), H.randn(B, T, *features, seed=seed + 1)
    H.assert_matches(*activation_pair(kind, pos), [gate])
    H.assert_matches(*gated_pair(kind, pos), [gate, up])


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

    with saved_tensors.saved() as record:
        y = mlp_like(x, u)
    saved = record.tensors
    H.assert_no_full_rows(saved, B, T)
    rows = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (B * k, D)}
    assert len(rows) == 2  # x's rows once (read by both ops), u's rows
    y.sum().backward()
    assert x.grad is not None and u.grad is not None


def test_rows_outputs_are_differentiable():
    pos, x, up = H.positions(2, 5, 3, seed=1), H.randn(2, 5, 4), H.randn(2, 5, 4, seed=2)
    H.assert_rows_output_differentiable(lambda x_: op(x_, "silu", pos), x, pos)
    H.assert_rows_output_differentiable(lambda g_: gated_op(g_, up, "gelu", pos), x, pos, which=1)
    H.assert_rows_output_differentiable(lambda u_: gated_op(x, u_, "gelu", pos), up, pos, which=2)
