"""pypeft::token_subset_linear, token_subset_lora_linear and token_subset_vera_linear
(TokenTune): what is particular to them (the op contract runs from
tests/op_table.py in test_op_contract.py). A frozen base (x_rows not saved),
float32 and low precision against tests/reference.py, forward bit for bit the
plain op, backward regenerating forward's dropout mask, what they save for
each training configuration, one x_rows for a layer's q/k/v projections, and
the row ids of lora_linear_backward / vera_linear_backward."""

import pytest
import torch
import torch.nn.functional as F

import reference as R
import saved_tensors
from conftest import DEVICES, requires_cuda
from pypeft.ops import (
    lora_linear,
    token_subset_linear,
    token_subset_lora_linear,
    token_subset_vera_linear,
    vera_linear,
)

ops = torch.ops.pypeft
SCALE = 0.75


def random_positions(batch, tokens, k, generator):
    """[B, k] distinct token indices per row, in no particular order."""
    rows = [torch.randperm(tokens, generator=generator)[:k] for _ in range(batch)]
    return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)


def make_case(B=2, T=6, k=3, n_in=8, n_out=5, r=3, dtype=torch.float64, adapter_dtype=None, device="cpu",
              bias=True, gen_seed=0):
    """Every tensor any of the three ops takes; each op picks its own."""
    g = torch.Generator().manual_seed(gen_seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(device)

    return dict(
        x=rnd(B, T, n_in), weight=rnd(n_out, n_in), bias=rnd(n_out) if bias else None,
        lora_a=rnd(r, n_in, dt=adapter_dtype), lora_b=rnd(n_out, r, dt=adapter_dtype),
        vera_a=rnd(r, n_in + 3, dt=adapter_dtype), vera_b=rnd(n_out + 2, r, dt=adapter_dtype),
        lambda_d=rnd(r, dt=adapter_dtype), lambda_b=rnd(n_out, dt=adapter_dtype),
        positions=random_positions(B, T, k, g).to(device),
    )


def seed_tensor(p, seed, device="cpu"):
    """The op's seed argument for an int seed (a tensor passes through)."""
    if p == 0:
        return None
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, device=device)


class Linear:
    trained = ("x", "weight", "bias")

    @staticmethod
    def ours(c, p, seed):
        return token_subset_linear(c["x"], c["weight"], c["bias"], c["positions"])

    @staticmethod
    def plain(c, p, seed):
        return F.linear(c["x"], c["weight"], c["bias"])

    @staticmethod
    def ref(c, p, seed):
        return R.token_subset(lambda x: F.linear(x, c["weight"], c["bias"]), c["positions"], c["x"])


class Lora:
    trained = ("x", "weight", "bias", "lora_a", "lora_b")

    @staticmethod
    def ours(c, p, seed):
        return token_subset_lora_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], SCALE, p,
                                        seed_tensor(p, seed, c["x"].device), c["positions"])

    @staticmethod
    def plain(c, p, seed):
        return lora_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], SCALE, p,
                           seed_tensor(p, seed, c["x"].device))

    @staticmethod
    def ref(c, p, seed):
        fn = lambda x: R.lora_linear(x, c["weight"], c["bias"], c["lora_a"], c["lora_b"], SCALE, p, seed)  # noqa: E731
        return R.token_subset(fn, c["positions"], c["x"])


class Vera:
    trained = ("x", "weight", "bias", "lambda_d", "lambda_b")

    @staticmethod
    def ours(c, p, seed):
        return token_subset_vera_linear(c["x"], c["weight"], c["bias"], c["vera_a"], c["vera_b"], c["lambda_d"],
                                        c["lambda_b"], p, seed_tensor(p, seed, c["x"].device), c["positions"])

    @staticmethod
    def plain(c, p, seed):
        return vera_linear(c["x"], c["weight"], c["bias"], c["vera_a"], c["vera_b"], c["lambda_d"], c["lambda_b"],
                           p, seed_tensor(p, seed, c["x"].device))

    @staticmethod
    def ref(c, p, seed):
        fn = lambda x: R.vera_linear(x, c["weight"], c["bias"], c["vera_a"], c["vera_b"], c["lambda_d"],  # noqa: E731
                                     c["lambda_b"], p, seed)
        return R.token_subset(fn, c["positions"], c["x"])


METHODS = {"linear": Linear, "lora": Lora, "vera": Vera}


def with_grad(case, trained, cast=None):
    """A fresh copy of case; the trained tensors require grad."""
    out = {}
    for k, v in case.items():
        if v is None or k == "positions":
            out[k] = v
            continue
        v = v.detach().clone() if cast is None else v.detach().to(cast).clone()
        out[k] = v.requires_grad_(k in trained)
    return out


def check_against_reference(method, case, p, seed, atol, rtol, atol_of_max=0.0, trained=None):
    """Forward and every trained tensor's gradient (x first; all the method
    trains unless `trained` says) equal the reference's in float64; grad_x is
    exactly zero at the unselected tokens. atol_of_max: an absolute tolerance
    of that share of the largest reference value (bf16)."""

    def tol(ref):
        return max(atol, atol_of_max * ref.abs().max().item()) if ref.numel() else atol

    m = METHODS[method]
    trained = [k for k in (trained or m.trained) if case[k] is not None]
    ours = with_grad(case, trained)
    ref = with_grad({k: v.cpu() if v is not None else None for k, v in case.items()}, trained,
                    cast=torch.float64)
    y = m.ours(ours, p, seed)
    y_ref = m.ref(ref, p, seed)
    assert y.dtype == case["x"].dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=tol(y_ref), rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [ours[k] for k in trained], g.to(y.dtype).to(y.device))
    want = torch.autograd.grad(y_ref, [ref[k] for k in trained], g)
    for name, a, b in zip(trained, got, want):
        assert a.dtype == ours[name].dtype and a.shape == ours[name].shape, name
        torch.testing.assert_close(a.double().cpu(), b, atol=tol(b), rtol=rtol, msg=lambda s: f"grad {name}: {s}")
    unselected = ~R.token_mask(case["positions"].cpu(), case["x"].shape[1])
    assert torch.all(got[0].cpu()[unselected] == 0)


# --- against the reference ----------------------------------------------------------

FROZEN_BASE = {
    # x_rows is then not saved: the backward op gets the empty [0] stand-in
    "linear": ("x",),
    "lora, A and B": ("x", "lora_a", "lora_b"),  # x_rows saved for grad_lora_a
    "lora, B only": ("x", "lora_b"),
    "vera": ("x", "lambda_d", "lambda_b"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trained", FROZEN_BASE, ids=list(FROZEN_BASE))
def test_matches_reference_frozen_base(device, trained):
    case = make_case(B=2, T=7, k=3, device=device)
    check_against_reference(trained.split(",")[0], case, 0.3, seed=17, atol=1e-10, rtol=1e-10,
                            trained=FROZEN_BASE[trained])


@pytest.mark.parametrize("method", METHODS)
def test_float32(method):
    case = make_case(B=2, T=12, k=5, n_in=32, n_out=24, r=8, dtype=torch.float32)
    check_against_reference(method, case, 0.25, seed=3, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16 adapter", "fp32 adapter"])
def test_bfloat16_activations(device, method, adapter_dtype):
    case = make_case(B=2, T=12, k=5, n_in=32, n_out=24, r=8, dtype=torch.bfloat16, adapter_dtype=adapter_dtype,
                     device=device)
    check_against_reference(method, case, 0.25, seed=3, atol=0.05, rtol=0.02, atol_of_max=0.02)


@requires_cuda
@pytest.mark.parametrize("method", METHODS)
def test_float16_on_cuda(method):
    case = make_case(B=2, T=12, k=5, n_in=32, n_out=24, r=8, dtype=torch.float16, adapter_dtype=torch.float32,
                     device="cuda")
    check_against_reference(method, case, 0.25, seed=3, atol=0.02, rtol=0.01, atol_of_max=0.01)


# --- forward is the plain op ---------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_forward_equals_the_plain_op_bitwise(device, method, p):
    case = make_case(B=3, T=9, k=4, n_in=24, n_out=16, r=4, dtype=torch.float32, device=device)
    m = METHODS[method]
    assert torch.equal(m.ours(case, p, 77), m.plain(case, p, 77))


def test_dropout_mask_is_forwards_in_backward():
    """Gradients at the selected tokens equal the plain op's there (which masks
    by the flat row b * T + t): backward regenerated forward's mask."""
    case = make_case(B=2, T=7, k=3, n_in=16, n_out=6, r=4)
    trained = ("x", "lora_a", "lora_b")
    ours, plain = with_grad(case, trained), with_grad(case, trained)
    g = torch.randn(2, 7, 6, dtype=torch.float64) * R.token_mask(case["positions"], 7).unsqueeze(-1)
    got = torch.autograd.grad(Lora.ours(ours, 0.5, 42), [ours[k] for k in trained], g)
    want = torch.autograd.grad(Lora.plain(plain, 0.5, 42), [plain[k] for k in trained], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    other_seed = torch.autograd.grad(Lora.ours(ours, 0.5, 43), ours["lora_a"], g)[0]
    assert not torch.allclose(other_seed, got[1])


# --- what backward keeps ---------------------------------------------------------------

def saved_activations(fn, params):
    """fn()'s output and the tensors autograd saves while it runs, parameters excluded."""
    with saved_tensors.saved(exclude=params) as record:
        out = fn()
    return out, record.activations()


SAVES = {
    # method, trained, the shapes saved besides positions [B, k] and the seed
    "linear, weight trained": ("linear", ("x", "weight", "bias"), {("rows", "in")}),
    "linear, weight frozen": ("linear", ("x",), set()),
    "lora": ("lora", ("x", "lora_a", "lora_b"), {("rows", "in"), ("rows", "r")}),
    "lora, only lora_b trained": ("lora", ("x", "lora_b"), {("rows", "r")}),
    "vera": ("vera", ("x", "lambda_d", "lambda_b"), {("rows", "r")}),
    "vera, weight trained": ("vera", ("x", "weight", "lambda_d", "lambda_b"), {("rows", "in"), ("rows", "r")}),
}


@pytest.mark.parametrize("case_name", SAVES, ids=list(SAVES))
def test_saves_only_selected_rows(case_name):
    method, trained, expected = SAVES[case_name]
    B, T, k, n_in, r = 4, 32, 3, 48, 6
    case = make_case(B=B, T=T, k=k, n_in=n_in, n_out=40, r=r, dtype=torch.float32)
    c = with_grad(case, trained)
    m = METHODS[method]
    params = [v for key, v in c.items() if key not in ("x", "positions")]
    y, saved = saved_activations(lambda: m.ours(c, 0.3, 1), params)
    dims = {"rows": B * k, "in": n_in, "r": r}
    want = {tuple(dims[d] for d in shape) for shape in expected} | {(B, k)}
    if method != "linear":
        want.add(())  # the dropout seed
    shapes = {tuple(t.shape) for t in saved}
    assert shapes == want, shapes
    assert all(B * T not in t.shape[:1] and tuple(t.shape[:2]) != (B, T) for t in saved)
    y.sum().backward()
    assert c["x"].grad is not None


def test_saved_bytes_scale_with_k_not_t():
    def saved_bytes(T, k):
        case = make_case(B=2, T=T, k=k, n_in=64, n_out=32, r=4, dtype=torch.float32)
        c = with_grad(case, Lora.trained)
        params = [v for key, v in c.items() if key not in ("x", "positions")]
        with saved_tensors.saved(exclude=params) as record:
            Lora.ours(c, 0.1, 1)
        return record.nbytes

    assert saved_bytes(T=64, k=4) == saved_bytes(T=512, k=4)
    assert saved_bytes(T=64, k=8) > saved_bytes(T=64, k=4)


def test_qkv_projections_save_one_x_rows():
    """Query, key and value projections of one x at the same positions save
    one copy of its selected rows; gradients are those of separate calls."""
    case = make_case(B=2, T=10, k=4, n_in=16, n_out=16, dtype=torch.float32)
    x = case["x"].clone().requires_grad_()
    ws = [torch.randn(16, 16, requires_grad=True) for _ in range(3)]
    a, bb = case["lora_a"].float().requires_grad_(), torch.randn(16, 3)
    pos = case["positions"]

    def qkv():
        q = token_subset_linear(x, ws[0], None, pos)
        k = token_subset_lora_linear(x, ws[1], None, a, bb, 1.0, 0.0, None, pos)  # LoRA on K: same rows
        v = token_subset_linear(x, ws[2], None, pos)
        return q, k, v

    (q, k, v), saved = saved_activations(qkv, [*ws, a, bb])
    x_rows = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (8, 16)}
    assert len(x_rows) == 1
    (q.sum() + k.sum() + v.sum()).backward()
    for w in (ws[0], ws[2]):
        want = torch.autograd.grad(R.token_subset(lambda t: F.linear(t, w), pos, x.detach()).sum(), w)[0]
        torch.testing.assert_close(w.grad, want)


# --- row ids in lora_linear_backward / vera_linear_backward -------------------------------

def test_backward_ops_with_row_ids_mask_gathered_rows_as_in_x():
    """The backward of gathered rows with their row ids equals the full
    backward with grad_out zero elsewhere; without the ids it would not."""
    c = make_case(B=3, T=5, k=2, n_in=12, n_out=6, r=4)
    x2 = c["x"].reshape(15, 12)
    rows = torch.tensor([7, 1, 12, 4])
    gy = torch.randn(15, 6, dtype=torch.float64)
    gy_sel = torch.zeros_like(gy).index_copy_(0, rows, gy[rows])
    seed = torch.tensor(21)
    _, u = ops.lora_linear(x2, c["weight"], None, c["lora_a"], c["lora_b"], 1.5, 0.5, seed)
    mask = [True, False, False, True, True]
    full = ops.lora_linear_backward(gy_sel, None, x2, c["weight"], c["lora_a"], c["lora_b"], u, 1.5, 0.5, seed,
                                    mask)
    part = ops.lora_linear_backward(gy[rows], None, x2[rows], c["weight"], c["lora_a"], c["lora_b"], u[rows], 1.5,
                                    0.5, seed, mask, rows)
    torch.testing.assert_close(part[0], full[0][rows])
    torch.testing.assert_close(part[3], full[3])
    torch.testing.assert_close(part[4], full[4])
    no_ids = ops.lora_linear_backward(gy[rows], None, x2[rows], c["weight"], c["lora_a"], c["lora_b"], u[rows],
                                      1.5, 0.5, seed, mask)
    assert not torch.allclose(no_ids[3], full[3])
    vargs = (c["weight"], c["vera_a"], c["vera_b"], c["lambda_d"], c["lambda_b"])
    _, uv = ops.vera_linear(x2, vargs[0], None, *vargs[1:], 0.5, seed)
    vfull = ops.vera_linear_backward(gy_sel, None, x2, *vargs, uv, 0.5, seed, mask)
    vpart = ops.vera_linear_backward(gy[rows], None, x2[rows], *vargs, uv[rows], 0.5, seed, mask, rows)
    for i in (0, 3, 4):
        want = vfull[i][rows] if i == 0 else vfull[i]
        torch.testing.assert_close(vpart[i], want)


# --- autograd -------------------------------------------------------------------------------

def test_vera_shared_matrices_must_be_frozen():
    c = with_grad(make_case(), ("x", "vera_a", "lambda_d"))
    with pytest.raises(RuntimeError, match="vera_a and vera_b are frozen"):
        Vera.ours(c, 0.0, 0).sum().backward()


def test_gathered_rows_carry_no_gradient():
    """x_rows / u_rows are outputs only to be saved: marked non-differentiable,
    so a loss on them cannot silently get a wrong gradient."""
    c = with_grad(make_case(), Lora.trained)
    y, x_rows, u_rows = ops.token_subset_lora_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], SCALE,
                                                     0.0, None, c["positions"])
    assert y.requires_grad and not x_rows.requires_grad and not u_rows.requires_grad
