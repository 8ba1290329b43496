"""pypeft::token_subset_attention: what is particular to it (the op contract
runs from tests/op_table.py in test_op_contract.py). Forward equal to SDPA in
transformers' layout, low precision, masks broadcast from any shape, the
chunked forward with dropout, which gradients are zero, padding queries that
see no key, what it saves (no scores, no query), a backward computing only
what is asked, and the mask taking no gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import reference as R
import saved_tensors
from conftest import DEVICES
from pypeft.ops import token_subset_attention

backward_op = torch.ops.pypeft.token_subset_attention_backward.default

INF = float("inf")


def make_qkv(B, Hq, Hkv, T, S, D=8, Dv=6, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    return rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, Dv)


def make_positions(B, T, k, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    rows = [torch.randperm(T, generator=g)[:k] for _ in range(B)]
    return (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)).to(device)


def make_mask(kind, B, T, S, dtype=torch.float64, device="cpu", seed=0):
    """(attn_mask, is_causal). Every mask leaves each query at least one key."""
    g = torch.Generator().manual_seed(seed + 2)
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool_padding":  # [B, 1, 1, S]: the last b % 3 keys of row b are padding
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        for b in range(B):
            pad = min(b % 3, S - 1)
            if pad:
                mask[b, ..., S - pad:] = False
        return mask.to(device), False
    if kind == "additive":  # [B, 1, T, S]: a bias, and -inf at random keys
        mask = torch.randn(B, 1, T, S, generator=g, dtype=torch.float64)
        blocked = torch.rand(B, 1, T, S, generator=g) < 0.3
        blocked[..., torch.arange(T), torch.arange(T) % S] = False
        return mask.masked_fill(blocked, -INF).to(dtype).to(device), False
    raise AssertionError(kind)


def reference(q, k, v, mask, is_causal, scale, p, seed, positions):
    """TokenTune attention from its definition: reference.attention whose
    unselected queries are constants."""
    return R.token_subset(lambda qq: R.attention(qq, k, v, mask, is_causal, scale, p, seed), positions, q, token_dim=2)


def check_against_reference(q, k, v, mask, is_causal, scale, p, positions, atol, rtol, atol_of_max=0.0,
                            seed=5):
    """Output and grads of q, k, v against the float64 reference."""

    def tol(ref):
        return max(atol, atol_of_max * ref.abs().max().item()) if ref.numel() else atol

    ours = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    ref_mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    out = token_subset_attention(*ours, mask, scale, is_causal, p, torch.tensor(seed) if p else None, positions)
    out_ref = reference(*ref, ref_mask, is_causal, scale, p, seed, positions)
    assert out.shape == out_ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), out_ref, atol=tol(out_ref), rtol=rtol)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(out.device)
    got = torch.autograd.grad(out, ours, g.to(out.dtype))
    want = torch.autograd.grad(out_ref, ref, g)
    for name, a, b, t in zip("qkv", got, want, ours):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        torch.testing.assert_close(a.double(), b, atol=tol(b), rtol=rtol, msg=lambda m: f"grad {name}: {m}")
    return got


MASKS = ["none", "bool_padding", "additive", "causal"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_forward_equals_sdpa_float32(device, mask_kind):
    B, Hq, Hkv, T, S = 3, 8, 2, 33, 33
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D=16, Dv=16, dtype=torch.float32, device=device)
    # transformers' layout: projections viewed [B, T, H, D] and transposed.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    mask, causal = make_mask(mask_kind, B, T, S, dtype=torch.float32, device=device)
    out = token_subset_attention(q, k, v, mask, None, causal, 0.0, None, make_positions(B, T, 4, device))
    want = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert out.transpose(1, 2).is_contiguous()  # laid out as [B, T, Hq, Dv]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("mask_kind", ["none", "additive", "causal"])
def test_low_precision(device, p, mask_kind):
    dtypes = [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for dtype in dtypes:
        B, Hq, Hkv, T, S = 2, 4, 2, 24, 24
        q, k, v = make_qkv(B, Hq, Hkv, T, S, D=32, Dv=32, dtype=dtype, device=device)
        mask, causal = make_mask(mask_kind, B, T, S, dtype=dtype, device=device)
        check_against_reference(q, k, v, mask, causal, 1 / math.sqrt(32), p, make_positions(B, T, 6, device),
                                atol=0.02, rtol=0.02, atol_of_max=0.02)


# Masks broadcast from other shapes than the models' [B, 1, 1|T, S].
MASK_SHAPES = {"[T, S]": (6, 9), "[S]": (9,), "[1, Hq, T, S]": (1, 4, 6, 9), "[B, Hq, 1, S]": (3, 4, 1, 9),
               "[B, 1, T, 1]": (3, 1, 6, 1)}


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bool_mask", [True, False])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=list(MASK_SHAPES))
def test_broadcast_masks_and_strided_inputs(p, bool_mask, mask_shape):
    """Also query, key, value in transformers' layout ([B, T, H, D] memory)."""
    B, Hq, Hkv, T, S = 3, 4, 2, 6, 9
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(B, Hq, Hkv, T, S))
    g = torch.Generator().manual_seed(3)
    shape = MASK_SHAPES[mask_shape]
    if bool_mask:
        mask = torch.rand(shape, generator=g) < 0.7
        mask[..., 0] = True  # every query keeps a key
    else:
        mask = torch.randn(shape, generator=g, dtype=torch.float64)
    check_against_reference(q, k, v, mask, False, 0.37, p, make_positions(B, T, 3), atol=1e-10, rtol=1e-9)


def test_dropout_forward_in_chunks():
    """Enough queries × keys that the forward with dropout runs in two chunks
    of query tokens (4M probabilities each): rows of both still carry the
    mask that backward regenerates."""
    B, Hq, Hkv, T, S = 1, 2, 1, 96, 32768
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D=4, Dv=4, dtype=torch.float32)
    positions = torch.tensor([[3, 95, 64, 63, 70]])
    check_against_reference(q, k, v, None, False, 0.5, 0.25, positions, atol=1e-5, rtol=1e-4)


def test_gradients_are_token_subset_semantics():
    """Unselected queries get zero gradient; key and value get what the
    selected queries send to every key token (not only the selected ones)."""
    q, k, v = make_qkv(2, 4, 2, 6, 6)
    positions = torch.tensor([[1, 4], [2, 5]])  # not token 0: it sees one key, its softmax is constant
    gq, gk, gv = check_against_reference(q, k, v, None, True, 0.4, 0.0, positions, atol=1e-10, rtol=1e-9)
    selected = R.token_mask(positions, 6)[:, None, :, None]
    assert torch.all(gq.masked_select(~selected) == 0)
    assert torch.all(gq.abs().sum(-1)[selected[..., 0].expand(2, 4, 6)] > 0)
    assert torch.all(gk.abs().sum(-1)[:, :, :5] > 0)  # causal: token 5 reaches keys 0..5


def test_left_padding_with_causal_mask():
    """Left-padded rows under a causal mask: padding queries see no key at all.
    Their output is 0 (as SDPA); unselected, they leave every gradient equal to
    the reference; selected, their gradient is finite: zero, as SDPA's own."""
    B, Hq, Hkv, T = 2, 4, 2, 7
    pad = [3, 0]
    keep = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(pad):
        keep[b, :n] = False
    mask = torch.ones(T, T, dtype=torch.bool).tril() & keep[:, None, None, :]  # [B, 1, T, T]
    q, k, v = make_qkv(B, Hq, Hkv, T, T)
    unselected = torch.tensor([[3, 6], [0, 2]])
    check_against_reference(q, k, v, mask, False, 0.5, 0.0, unselected, atol=1e-10, rtol=1e-9)
    out = token_subset_attention(q, k, v, mask, 0.5, False, 0.0, None, unselected)
    assert torch.all(out[0, :, :3] == 0)

    selected = torch.tensor([[1, 5], [0, 2]])  # token 1 of row 0 is padding
    gq, _, _ = check_against_reference(q, k, v, mask, False, 0.5, 0.0, selected, atol=1e-10, rtol=1e-9)
    assert torch.all(gq[0, :, 1] == 0)
    for p in (0.0, 0.3):  # with dropout too (the explicit reference would give NaN there)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = token_subset_attention(qq, kk, vv, mask, 0.5, False, p, torch.tensor(2), selected)
        assert torch.all(out[0, :, :3] == 0)
        grads = torch.autograd.grad(out.square().sum(), (qq, kk, vv))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.all(grads[0][0, :, 1] == 0)


def test_saves_selected_query_rows_keys_values_mask_only():
    B, Hq, T, S, D, k = 2, 4, 16, 16, 8, 3
    q, kk, v = make_qkv(B, Hq, Hq, T, S, D=D, Dv=D, dtype=torch.float32)
    mask, _ = make_mask("additive", B, T, S, dtype=torch.float32)
    positions = make_positions(B, T, k)
    for p in (0.0, 0.3):
        qq, kg, vg = (t.clone().requires_grad_() for t in (q, kk, v))
        with saved_tensors.saved() as record:
            out = token_subset_attention(qq, kg, vg, mask, 0.3, False, p, torch.tensor(1), positions)
        saved = record.tensors
        kv = {kg.data_ptr(), vg.data_ptr()}
        for t in saved:
            assert t.numel() != B * Hq * T * S, tuple(t.shape)  # no scores / probabilities
            assert t.numel() != B * Hq * T * D or t.data_ptr() in kv, tuple(t.shape)  # no query, no output
        inputs = {kg.data_ptr(), vg.data_ptr(), mask.data_ptr(), positions.data_ptr()}
        rows = [t for t in saved if t.data_ptr() not in inputs and t.numel() > 1]
        assert [tuple(t.shape) for t in rows] == [(B, Hq, k, D)]  # the selected query rows
        out.sum().backward()
        assert qq.grad is not None and kg.grad is not None and vg.grad is not None


def test_backward_computes_only_what_is_asked():
    q, k, v = make_qkv(2, 4, 2, 5, 7)
    positions = make_positions(2, 5, 2)
    rows = q.gather(2, positions[:, None, :, None].expand(2, 4, 2, 8))
    grad_out = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    full = backward_op(grad_out, rows, k, v, None, 0.3, True, 0.2, torch.tensor(3), positions, [True] * 3)
    for need in ([True, False, False], [False, True, False], [False, False, True], [False] * 3):
        part = backward_op(grad_out, rows, k, v, None, 0.3, True, 0.2, torch.tensor(3), positions, need)
        for asked, a, b in zip(need, part, full):
            if asked:
                torch.testing.assert_close(a, b, atol=0, rtol=0)
            else:
                assert a is None


def test_mask_requiring_grad_raises():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 5, 5))
    positions = make_positions(2, 5, 2)
    bias = torch.zeros(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="attn_mask takes no gradient"):
        token_subset_attention(q, k, v, bias, 0.3, False, 0.0, None, positions).sum().backward()
