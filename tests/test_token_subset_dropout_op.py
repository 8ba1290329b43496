"""pypeft::token_subset_dropout against tests/reference.py (the counter-hash
mask over x viewed as [B * T, F], token_subset semantics), what it saves,
opcheck, gradcheck, torch.compile, TorchScript and its argument checks."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.library import opcheck

import reference as R
import token_subset_helpers as H
from conftest import DEVICES, requires_cuda
from pypeft.ops import counter_dropout, token_subset_dropout

op = torch.ops.pypeft.token_subset_dropout.default
backward_op = torch.ops.pypeft.token_subset_dropout_backward.default


def plain_dropout(p, seed):
    """The reference mask over x viewed as [B * T, F]: row b * T + t."""
    def fn(t):
        return R.dropout(t.reshape(t.shape[0] * t.shape[1], math.prod(t.shape[2:])), seed, p).reshape(t.shape)
    return fn


def dropout_pair(p, seed, pos):
    """(ours, reference) as functions of x."""
    return (lambda x: token_subset_dropout(x, p, torch.tensor(seed) if p else None, pos),
            lambda x: R.token_subset(plain_dropout(p, seed), pos, x))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", H.SHAPES, ids=H.SHAPE_IDS)
def test_matches_reference(shape, p):
    B, T, k = shape
    pos = H.positions(B, T, k, seed=k)
    H.assert_matches(*dropout_pair(p, 17, pos), [H.randn(B, T, 16, seed=1)])


@settings(max_examples=25, deadline=None)
@given(shape=H.token_shapes(), features=st.lists(st.integers(0, 5), max_size=2),
       p=st.sampled_from([0.0, 0.2, 0.7]), seed=st.integers(-(2**63), 2**63 - 1))
def test_random_shapes(shape, features, p, seed):
    B, T, k, pos_seed = shape
    pos = H.positions(B, T, k, seed=pos_seed)
    H.assert_matches(*dropout_pair(p, seed, pos), [H.randn(B, T, *features, seed=pos_seed)])


@pytest.mark.parametrize("features", [(), (3, 4)], ids=["[B,T]", "[B,T,3,4]"])
def test_any_trailing_dims(features):
    pos = H.positions(3, 6, 2, seed=4)
    H.assert_matches(*dropout_pair(0.5, 3, pos), [H.randn(3, 6, *features, seed=5)])


def test_empty_batch_and_non_contiguous_x():
    H.assert_matches(*dropout_pair(0.3, 1, H.positions(0, 4, 2)), [H.randn(0, 4, 6)])
    x = H.randn(5, 16, 3, seed=2).permute(2, 0, 1)
    assert not x.is_contiguous()
    H.assert_matches(*dropout_pair(0.3, 1, H.positions(3, 5, 2, seed=3)), [x])


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


def test_saves_only_the_seed_and_positions():
    B, T, k = 4, 16, 3
    pos, seed = H.positions(B, T, k, seed=2), torch.tensor(5)
    x = H.randn(B, T, 32, dtype=torch.float32).requires_grad_(True)
    saved, y = H.saved_tensors(lambda t: token_subset_dropout(t, 0.2, seed, pos), x)
    assert [t.data_ptr() for t in saved] == [seed.data_ptr(), pos.data_ptr()]
    H.assert_no_full_rows(saved, B, T)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(device, p):
    pos = H.positions(3, 5, 2, device=device)
    x = H.randn(3, 5, 6, dtype=torch.float32, device=device).requires_grad_(True)
    seed = torch.tensor(7) if p else None
    opcheck(op, (x, p, seed, pos))
    opcheck(backward_op, (x.detach(), p, seed, pos))


def test_gradcheck_float64():
    pos = H.positions(2, 5, 3, seed=6)
    fn, (x_sel,) = H.on_selected_tokens(lambda t: token_subset_dropout(t, 0.4, torch.tensor(2), pos), pos,
                                        H.randn(2, 5, 4, seed=7))
    assert torch.autograd.gradcheck(fn, (x_sel.requires_grad_(True),))


def _step(x, seed, pos):
    return token_subset_dropout(x, 0.3, seed, pos).pow(2).mean()


def _check_compiled(backend):
    torch._dynamo.reset()
    pos = H.positions(2, 6, 3, seed=1)
    x = H.randn(2, 6, 16, dtype=torch.float32, seed=2).requires_grad_(True)
    compiled = torch.compile(_step, backend=backend, fullgraph=True)
    for seed in (torch.tensor(1), torch.tensor(2)):  # a new seed is no new graph
        loss, want = compiled(x, seed, pos), _step(x, seed, pos)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])


def test_compile_fullgraph_aot_eager():
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled("inductor")


def test_torchscript():
    @torch.jit.script
    def scripted(x: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.ops.pypeft.token_subset_dropout(x, 0.5, seed, pos)

    pos, x = H.positions(2, 4, 2), H.randn(2, 4, 8)
    torch.testing.assert_close(scripted(x, torch.tensor(3), pos), plain_dropout(0.5, 3)(x))


def test_no_double_backward():
    pos = H.positions(1, 3, 2)
    x = H.randn(1, 3, 4).requires_grad_(True)
    (g,) = torch.autograd.grad(token_subset_dropout(x, 0.2, torch.tensor(1), pos).pow(2).sum(), x,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


@pytest.mark.parametrize("case", H.BAD_POSITIONS, ids=list(H.BAD_POSITIONS))
def test_bad_positions(case):
    x = torch.randn(2, 5, 4)
    H.check_bad_positions(lambda pos: token_subset_dropout(x, 0.2, torch.tensor(1), pos), case)


BAD = {
    "p = 1": (dict(p=1.0), ValueError, "'p'", "a probability in [0, 1)"),
    "p < 0": (dict(p=-0.1), ValueError, "'p'", "-0.1"),
    "missing seed": (dict(seed=None), ValueError, "'seed'", "None"),
    "float seed": (dict(seed=torch.tensor(1.0)), TypeError, "'seed'", "Float"),
    "int x": (dict(x=torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "'x'", "Long"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    changes, exc, arg, got = BAD[case]
    args = dict(x=torch.randn(2, 5, 4), p=0.2, seed=torch.tensor(1), positions=torch.tensor([[0, 1], [2, 3]]))
    args.update(changes)
    with pytest.raises(exc) as info:
        op(**args)
    msg = str(info.value)
    assert "token_subset_dropout" in msg and arg in msg and "expected" in msg and got in msg, msg


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
