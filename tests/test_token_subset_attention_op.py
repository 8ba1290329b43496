"""pypeft::token_subset_attention against float64 references built from
torch's scaled_dot_product_attention (tests/reference.py's token_subset), with
and without dropout, masks, causal, GQA; padding queries; what it saves;
opcheck, gradcheck, torch.compile, TorchScript and its argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import reference as R
from conftest import DEVICES
from pypeft.ops import token_subset_attention

op = torch.ops.pypeft.token_subset_attention.default
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
    """TokenTune attention from its definition: SDPA whose unselected queries
    are constants; with dropout, written out with R.dropout's mask on the
    probabilities viewed as rows (b * Hq + h) * T + t."""

    if mask is not None and mask.dim() < 4:  # SDPA's CPU kernels reject a 1-D mask; same broadcast
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def attend(qq):
        if p == 0:
            return F.scaled_dot_product_attention(qq, k, v, mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=True)
        groups = qq.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = qq @ kk.transpose(-2, -1) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -INF) if mask.dtype == torch.bool else scores + mask
        if is_causal:
            T, S = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), -INF)
        return R.dropout(torch.softmax(scores, -1), seed, p) @ vv

    return R.token_subset(attend, positions, q, token_dim=2)


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


# (B, Hq, Hkv, T, S, k): k = 1, middle, T; B = 1 and > 1; GQA, MHA, MQA; T != S.
SHAPES = {
    "B1 gqa k1": (1, 4, 2, 6, 6, 1),
    "gqa T<S mid k": (3, 4, 2, 6, 9, 3),
    "mha k=T": (2, 2, 2, 5, 5, 5),
    "mha T>S": (2, 4, 4, 7, 4, 2),
    "mqa k=T T<S": (2, 4, 1, 5, 8, 5),
}
MASKS = ["none", "bool_padding", "additive", "causal"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_matches_reference_float64(device, p, mask_kind, shape):
    B, Hq, Hkv, T, S, k = SHAPES[shape]
    q, kk, v = make_qkv(B, Hq, Hkv, T, S, device=device)
    mask, causal = make_mask(mask_kind, B, T, S, device=device)
    check_against_reference(q, kk, v, mask, causal, 0.37, p, make_positions(B, T, k, device), atol=1e-10,
                            rtol=1e-9)


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
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = token_subset_attention(qq, kg, vg, mask, 0.3, False, p, torch.tensor(1), positions)
        kv = {kg.data_ptr(), vg.data_ptr()}
        for t in saved:
            assert t.numel() != B * Hq * T * S, tuple(t.shape)  # no scores / probabilities
            assert t.numel() != B * Hq * T * D or t.data_ptr() in kv, tuple(t.shape)  # no query, no output
        inputs = {kg.data_ptr(), vg.data_ptr(), mask.data_ptr(), positions.data_ptr()}
        rows = [t for t in saved if t.data_ptr() not in inputs and t.numel() > 1]
        assert [tuple(t.shape) for t in rows] == [(B, Hq, k, D)]  # the selected query rows
        out.sum().backward()
        assert qq.grad is not None and kg.grad is not None and vg.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_opcheck(device, p, mask_kind):
    B, Hq, Hkv, T, S = 2, 4, 2, 5, 7
    q, k, v = (t.requires_grad_() for t in make_qkv(B, Hq, Hkv, T, S, dtype=torch.float32, device=device))
    mask, causal = make_mask(mask_kind, B, T, S, dtype=torch.float32, device=device)
    seed = torch.tensor(7) if p else None
    positions = make_positions(B, T, 3, device)
    opcheck(op, (q, k, v, mask, 0.3, causal, p, seed, positions))
    grad_out = torch.randn(B, Hq, T, 6, device=device)
    rows = torch.randn(B, Hq, 3, 8, device=device)
    for need in ([True] * 3, [True, False, False], [False, True, False], [False, False, True]):
        opcheck(backward_op, (grad_out, rows, k.detach(), v.detach(), mask, 0.3, causal, p, seed, positions, need))


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


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_gradcheck_float64(p, mask_kind):
    """The selected output rows depend on query only through the selected
    tokens, so for them the op's gradients are the true ones."""
    B, Hq, Hkv, T, S = 2, 2, 1, 4, 5
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D=3, Dv=2)
    mask, causal = make_mask(mask_kind, B, T, S)
    positions = torch.tensor([[2, 0], [3, 1]])
    index = positions[:, None, :, None].expand(B, Hq, 2, 2)

    def fn(q, k, v):
        out = token_subset_attention(q, k, v, mask, 0.6, causal, p, torch.tensor(4), positions)
        return out.gather(2, index)

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, v)])


def test_compile_fullgraph_aot_eager_dynamic():
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 6, 9, dtype=torch.float32))
    mask, _ = make_mask("bool_padding", 2, 6, 9)

    def step(q, k, v, mask, seed, positions):
        return token_subset_attention(q, k, v, mask, 0.3, False, 0.1, seed, positions).pow(2).mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for T, k_sel in ((6, 2), (6, 4)):
        args = (q, k, v, mask, torch.tensor(4), make_positions(2, T, k_sel))
        loss = compiled(*args)
        torch.testing.assert_close(loss, step(*args))
        got = torch.autograd.grad(loss, (q, k, v))
        want = torch.autograd.grad(step(*args), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_compile_inductor():
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 6, 6, dtype=torch.float32))
    positions = make_positions(2, 6, 3)

    def step(q, k, v):
        return token_subset_attention(q, k, v, None, 0.3, True, 0.0, None, positions).pow(2).mean()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, k, v)
    torch.testing.assert_close(loss, step(q, k, v))
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(step(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_torchscript():
    @torch.jit.script
    def scripted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.ops.pypeft.token_subset_attention(q, k, v, None, 0.5, True, 0.0, None, positions)[0]

    q, k, v = make_qkv(2, 4, 2, 6, 6, dtype=torch.float32)
    torch.testing.assert_close(
        scripted(q, k, v, make_positions(2, 6, 2)),
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True), atol=1e-6, rtol=1e-6)


def test_empty_selection_and_empty_batch():
    for B, k in ((2, 0), (0, 0)):
        q, kk, v = (t.requires_grad_() for t in make_qkv(B, 4, 2, 5, 7))
        out = token_subset_attention(q, kk, v, None, 0.3, False, 0.2, torch.tensor(1), make_positions(B, 5, k))
        out.sum().backward()
        assert out.shape == (B, 4, 5, 6)
        assert torch.all(q.grad == 0) and torch.all(kk.grad == 0) and torch.all(v.grad == 0)


def test_mask_requiring_grad_and_double_backward_raise():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 5, 5))
    positions = make_positions(2, 5, 2)
    bias = torch.zeros(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="attn_mask takes no gradient"):
        token_subset_attention(q, k, v, bias, 0.3, False, 0.0, None, positions).sum().backward()
    out = token_subset_attention(q, k, v, None, 0.3, False, 0.0, None, positions)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        gq.sum().backward()


def _args(**changes):
    B, Hq, Hkv, T, S = 2, 4, 2, 5, 7
    q, k, v = make_qkv(B, Hq, Hkv, T, S, dtype=torch.float32)
    args = dict(query=q, key=k, value=v, attn_mask=None, scale=0.3, is_causal=False, dropout_p=0.0, seed=None,
                positions=torch.tensor([[0, 4], [1, 2]]))
    args.update(changes)
    return args


BAD = {
    "query 3-D": (dict(query=torch.randn(2, 4, 5)), ValueError, "'query'", "3-D"),
    "query int": (dict(query=torch.ones(2, 4, 5, 8, dtype=torch.long)), TypeError, "'query'", "Long"),
    "heads": (dict(key=torch.randn(2, 3, 7, 8), value=torch.randn(2, 3, 7, 6)), ValueError, "'key'", "[2, 3, 7, 8]"),
    "head dim": (dict(key=torch.randn(2, 2, 7, 5)), ValueError, "'key'", "[2, 2, 7, 5]"),
    "key batch": (dict(key=torch.randn(1, 2, 7, 8)), ValueError, "'key'", "[1, 2, 7, 8]"),
    "value tokens": (dict(value=torch.randn(2, 2, 6, 6)), ValueError, "'value'", "[2, 2, 6, 6]"),
    "key dtype": (dict(key=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, "'key'", "Double"),
    "value dtype": (dict(value=torch.randn(2, 2, 7, 6).bfloat16()), TypeError, "'value'", "BFloat16"),
    "mask dtype": (dict(attn_mask=torch.zeros(2, 1, 5, 7, dtype=torch.float64)), TypeError, "'attn_mask'", "Double"),
    "mask shape": (dict(attn_mask=torch.zeros(2, 1, 5, 8)), ValueError, "'attn_mask'", "[2, 1, 5, 8]"),
    "mask 5-D": (dict(attn_mask=torch.zeros(1, 2, 1, 5, 7)), ValueError, "'attn_mask'", "[1, 2, 1, 5, 7]"),
    "mask and causal": (dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), ValueError,
                        "'is_causal'", "True together with an attn_mask"),
    "scale 0": (dict(scale=0.0), ValueError, "'scale'", "0"),
    "scale inf": (dict(scale=INF), ValueError, "'scale'", "inf"),
    "scale nan": (dict(scale=float("nan")), ValueError, "'scale'", "nan"),
    "dropout 1": (dict(dropout_p=1.0, seed=torch.tensor(1)), ValueError, "'dropout_p'", "1"),
    "no seed": (dict(dropout_p=0.1), ValueError, "'seed'", "None"),
    "positions range": (dict(positions=torch.tensor([[0, 5], [1, 2]])), ValueError, "'positions'", "[0, 5]"),
    "positions repeat": (dict(positions=torch.tensor([[3, 3], [1, 2]])), ValueError, "'positions'", "repeated"),
    "positions batch": (dict(positions=torch.tensor([[0, 1]])), ValueError, "'positions'", "[1, 2]"),
    "positions dtype": (dict(positions=torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)), TypeError,
                        "'positions'", "Int"),
    "too many positions": (dict(positions=torch.arange(6).repeat(2, 1)), ValueError, "'positions'", "6"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_names_the_argument(case):
    changes, exc, arg, got = BAD[case]
    with pytest.raises(exc) as info:
        op(*_args(**changes).values())
    msg = str(info.value)
    assert "pypeft.token_subset_attention" in msg and arg in msg and "expected" in msg and got in msg, msg


BAD_BACKWARD = {
    "grad_out heads": (dict(grad_out=torch.randn(2, 3, 5, 6)), "'grad_out'", "[2, 3, 5, 6]"),
    "grad_out value dim": (dict(grad_out=torch.randn(2, 4, 5, 4)), "'grad_out'", "[2, 4, 5, 4]"),
    "query_rows k": (dict(query_rows=torch.randn(2, 4, 3, 8)), "'query_rows'", "[2, 4, 3, 8]"),
    "positions batch": (dict(positions=torch.tensor([[0, 1]])), "'positions'", "[1, 2]"),
}


@pytest.mark.parametrize("case", BAD_BACKWARD, ids=list(BAD_BACKWARD))
def test_bad_backward_input_names_the_argument(case):
    changes, arg, got = BAD_BACKWARD[case]
    a = _args()
    b = dict(grad_out=torch.randn(2, 4, 5, 6), query_rows=torch.randn(2, 4, 2, 8), key=a["key"], value=a["value"],
             attn_mask=None, scale=0.3, is_causal=False, dropout_p=0.0, seed=None, positions=a["positions"],
             output_mask=[True] * 3)
    b.update(changes)
    with pytest.raises(ValueError) as info:
        backward_op(*b.values())
    msg = str(info.value)
    assert "pypeft.token_subset_attention_backward" in msg and arg in msg and "expected" in msg and got in msg, msg
