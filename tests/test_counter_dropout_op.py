"""pypeft::counter_dropout: what is particular to it (the op contract runs from
tests/op_table.py in test_op_contract.py): the mask against tests/reference.py
in every dtype, rows gathered from a tensor keep their mask, the share dropped,
and the gradient is the same mask."""

import pytest
import torch

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
