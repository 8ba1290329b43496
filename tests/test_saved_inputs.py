"""What lora_linear keeps for backward when its input comes from a cheap
producer (GELU, a product) or is a small view of a large storage: less
memory, the same gradients."""

import pytest
import torch
import torch.nn.functional as F

import reference as R
import saved_tensors
from pypeft.ops import lora_linear


def saved_storages(fn):
    """fn()'s output and {storage: bytes} of what autograd saved meanwhile."""
    with saved_tensors.saved() as record:
        out = fn()
    return out, record.storages()


def weights(n_in=24, n_out=16, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
    a = torch.randn(r, n_in, generator=g).requires_grad_()
    bb = torch.randn(n_out, r, generator=g).requires_grad_()
    return w, b, a, bb


PRODUCERS = {
    "gelu": lambda h, o: F.gelu(h),
    "gelu tanh": lambda h, o: F.gelu(h, approximate="tanh"),
    "silu gate times up": lambda h, o: F.silu(h) * o,
    "product": lambda h, o: h * o,
}


@pytest.mark.parametrize("producer", PRODUCERS, ids=list(PRODUCERS))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cheap_producer_output_is_recomputed_not_kept(producer, p):
    w, b, a, bb = weights()
    h = torch.randn(5, 7, 24, requires_grad=True)
    other = torch.randn(5, 7, 24, requires_grad=True)
    seed = torch.tensor(3) if p else None

    def forward():
        x = PRODUCERS[producer](h, other)
        return x, lora_linear(x, w, b, a, bb, 0.5, p, seed)

    (x, y), storages = saved_storages(forward)
    assert x.untyped_storage().data_ptr() not in storages  # x itself is not kept
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (h, other, a, bb), g, allow_unused=True)
    # the reference: the same graph with x kept as is
    hr, otr = h.detach().requires_grad_(), other.detach().requires_grad_()
    ar, br = a.detach().requires_grad_(), bb.detach().requires_grad_()
    yr = R.lora_linear(PRODUCERS[producer](hr, otr), w, b, ar, br, 0.5, p, 3)
    want = torch.autograd.grad(yr, (hr, otr, ar, br), g, allow_unused=True)
    for u, v in zip(got, want):
        if v is None:
            assert u is None or torch.count_nonzero(u) == 0
        else:
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_small_view_of_a_large_storage_is_compacted():
    w, b, a, bb = weights()
    hidden = torch.randn(64, 32, 24, requires_grad=True) * 1.0  # a non-leaf, like a layer output
    first_tokens = hidden[:, 0]                                  # [64, 24] view of [64, 32, 24]
    y, storages = saved_storages(lambda: lora_linear(first_tokens, w, b, a, bb, 1.0))
    assert hidden.untyped_storage().data_ptr() not in storages
    assert sum(storages.values()) < hidden.untyped_storage().nbytes() / 4
    y.sum().backward()


def test_plain_input_is_kept_once():
    w, b, a, bb = weights()
    x = torch.randn(5, 24, requires_grad=True)
    y, storages = saved_storages(lambda: lora_linear(x, w, b, a, bb, 1.0))
    assert x.untyped_storage().data_ptr() in storages
