"""pypeft::counter_dropout: the mask against tests/reference.py (with and
without row ids), rows gathered from a tensor keep their mask, gradient,
opcheck, compile and argument checks."""

import pytest
import torch
from torch.library import opcheck

import reference as R
from conftest import DEVICES
from pypeft.ops import counter_dropout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_matches_reference(device, dtype, p):
    x = torch.randn(3, 7, 33, dtype=torch.float64).to(dtype).to(device)
    got = counter_dropout(x, p, torch.tensor(11))
    want = R.dropout(x.double().cpu(), 11, p)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_rows_keep_their_mask(device):
    x = torch.randn(40, 16, device=device)
    ids = torch.tensor([3, 17, 0, 39, 21], device=device)
    full = counter_dropout(x, 0.4, torch.tensor(5))
    part = counter_dropout(x[ids], 0.4, torch.tensor(5), ids)
    torch.testing.assert_close(part, full[ids], atol=0, rtol=0)
    want = R.dropout(x[ids].cpu(), 5, 0.4, row_ids=ids.tolist())
    torch.testing.assert_close(part.cpu(), want)


def test_drops_about_p_and_changes_with_seed():
    x = torch.ones(256, 256)
    a = counter_dropout(x, 0.25, torch.tensor(1))
    b = counter_dropout(x, 0.25, torch.tensor(2))
    assert abs((a == 0).float().mean().item() - 0.25) < 0.01
    assert not torch.equal(a, b)


def test_gradient_is_the_same_mask():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    ids = torch.arange(6) * 7
    y = counter_dropout(x, 0.3, torch.tensor(4), ids)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, R.dropout(torch.ones_like(x), 4, 0.3, row_ids=ids.tolist()))
    torch.autograd.gradcheck(lambda t: counter_dropout(t, 0.3, torch.tensor(4), ids), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(4, 5, 6, device=device, requires_grad=True)
    opcheck(torch.ops.pypeft.counter_dropout.default, (x, 0.2, torch.tensor(3), None))
    ids = torch.arange(20, device=device) + 100
    opcheck(torch.ops.pypeft.counter_dropout.default, (x, 0.2, torch.tensor(3), ids))


def test_compile_fullgraph():
    f = torch.compile(lambda t, s: counter_dropout(t, 0.2, s) * 2, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 8, requires_grad=True)
    y = f(x, torch.tensor(9))
    torch.testing.assert_close(y, counter_dropout(x, 0.2, torch.tensor(9)) * 2)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=1.0), "argument 'p'"),
    (dict(p=0.2, seed=None), "argument 'seed'"),
    (dict(row_ids=torch.arange(3)), "argument 'row_ids'"),
    (dict(row_ids=torch.arange(4).float()), "argument 'row_ids'"),
])
def test_bad_input(kwargs, match):
    args = dict(x=torch.randn(4, 5), p=0.2, seed=torch.tensor(1), row_ids=None) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        counter_dropout(**args)
