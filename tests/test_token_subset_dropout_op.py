"""pypeft::token_subset_dropout: what is particular to it (the op contract runs
from tests/op_table.py in test_op_contract.py). Random shapes against
tests/reference.py (the counter-hash mask over x viewed as [B * T, F],
token_subset semantics), forward bit for bit counter_dropout of the flat rows,
bfloat16, p = 0 as a copy, and CUDA drawing the CPU's mask."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import reference as R
import token_subset_helpers as H
from conftest import DEVICES, requires_cuda
from pypeft.ops import counter_dropout, token_subset_dropout

backward_op = torch.ops.pypeft.token_subset_dropout_backward.default


def plain_dropout(p, seed):
    """The reference mask over x viewed as [B * T, F]: row b * T + t."""
    return lambda t: R.flat_row_dropout(t, seed, p)


def dropout_pair(p, seed, pos):
    """(ours, reference) as functions of x."""
    return (lambda x: token_subset_dropout(x, p, torch.tensor(seed) if p else None, pos),
            lambda x: R.token_subset(plain_dropout(p, seed), pos, x))


@settings(max_examples=25, deadline=None)
@given(shape=H.token_shapes(), features=st.lists(st.integers(0, 5), max_size=2),
       p=st.sampled_from([0.0, 0.2, 0.7]), seed=st.integers(-(2**63), 2**63 - 1))
def test_random_shapes(shape, features, p, seed):
    B, T, k, pos_seed = shape
    pos = H.positions(B, T, k, seed=pos_seed)
    H.assert_matches(*dropout_pair(p, seed, pos), [H.randn(B, T, *features, seed=pos_seed)])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_counter_dropout_of_the_flat_rows_bitwise(device):
    x = H.randn(3, 9, 4, 5, dtype=torch.float32, device=device)
    pos = H.positions(3, 9, 4, device=device)
    y = token_subset_dropout(x, 0.4, torch.tensor(8), pos)
    assert torch.equal(y, counter_dropout(x.reshape(27, 20), 0.4, torch.tensor(8)).view(x.shape))
    torch.testing.assert_close(y.cpu(), plain_dropout(0.4, 8)(x.cpu()))  # x * keep / (1 - p): rounds apart


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_within_tolerance(device):
    pos = H.positions(3, 8, 5, seed=11, device=device)
    x = H.randn(3, 8, 64, seed=12).to(torch.bfloat16).to(device)
    H.assert_matches(*dropout_pair(0.25, 5, pos), [x], atol=0.02, rtol=0.02)


def test_p_zero_is_a_copy_whose_gradient_keeps_the_selected_tokens():
    pos = H.positions(2, 5, 2, seed=1)
    x = H.randn(2, 5, 3).requires_grad_(True)
    y = token_subset_dropout(x, 0.0, None, pos)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, R.token_mask(pos, 5).unsqueeze(-1).double().expand_as(x))


@requires_cuda
def test_cuda_draws_the_cpu_mask():
    pos = H.positions(4, 33, 7)
    x = H.randn(4, 33, 70)
    y = token_subset_dropout(x, 0.3, torch.tensor(99), pos)
    y_cuda = token_subset_dropout(x.cuda(), 0.3, torch.tensor(99), pos.cuda())
    torch.testing.assert_close(y_cuda.cpu(), y, atol=0, rtol=0)
    g = backward_op(x, 0.3, torch.tensor(99), pos)
    g_cuda = backward_op(x.cuda(), 0.3, torch.tensor(99), pos.cuda())
    torch.testing.assert_close(g_cuda.cpu(), g, atol=0, rtol=0)
