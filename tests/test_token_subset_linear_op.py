"""pypeft::token_subset_linear, token_subset_lora_linear and token_subset_vera_linear
(TokenTune) against tests/reference.py, what they save for backward, opcheck,
gradcheck, torch.compile, TorchScript, and their argument checks."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import reference as R
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

SELECTIONS = {"B=1, k=1": (1, 5, 1), "B=2, middle k": (2, 6, 3), "B=3, k=T": (3, 4, 4)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("selection", SELECTIONS, ids=list(SELECTIONS))
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_matches_reference_float64(device, method, selection, p, bias):
    B, T, k = SELECTIONS[selection]
    case = make_case(B=B, T=T, k=k, device=device, bias=bias, gen_seed=B * 100 + k)
    check_against_reference(method, case, p, seed=1234, atol=1e-10, rtol=1e-10)


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


EDGE_CASES = {
    "empty batch": dict(B=0, T=4, k=2),
    "no token selected": dict(B=2, T=4, k=0),
    "r=1": dict(r=1),
    "r > in and out": dict(n_in=3, n_out=2, r=7),
    "many rows (several CPU row blocks)": dict(B=3, T=300, k=200, n_in=64, n_out=16, r=4),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=list(EDGE_CASES))
def test_matches_reference_edge_shapes(method, case):
    check_against_reference(method, make_case(**EDGE_CASES[case]), 0.2, seed=5, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_x(method):
    case = make_case(B=3, T=5, k=2, n_in=8)
    case["x"] = torch.randn(8, 5, 3, dtype=torch.float64).permute(2, 1, 0)
    assert not case["x"].is_contiguous()
    check_against_reference(method, case, 0.4, seed=9, atol=1e-10, rtol=1e-10)


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
    """The tensors autograd saves while fn() runs, parameters excluded."""
    ptrs = {t.untyped_storage().data_ptr() for t in params if t is not None}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, [t for t in saved if t.untyped_storage().data_ptr() not in ptrs]


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
        _, saved = saved_activations(lambda: Lora.ours(c, 0.1, 1), params)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(storages.values())

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


def test_bad_row_ids_name_the_argument():
    c = make_case()
    x2 = c["x"].reshape(12, 8)
    u = torch.zeros(12, 3, dtype=torch.float64)
    args = (torch.zeros(12, 5, dtype=torch.float64), None, x2, c["weight"], c["lora_a"], c["lora_b"], u, 1.0, 0.1,
            torch.tensor(1), [True] * 5)
    with pytest.raises(TypeError, match="lora_linear_backward: argument 'row_ids'.*int64"):
        ops.lora_linear_backward(*args, torch.arange(12, dtype=torch.int32))
    with pytest.raises(ValueError, match="'row_ids'.*one id per row of x \\(12\\)"):
        ops.lora_linear_backward(*args, torch.arange(11))


# --- opcheck -----------------------------------------------------------------------------

def forward_args(method, c, p):
    seed = seed_tensor(p, 7, c["x"].device)
    if method == "linear":
        return ops.token_subset_linear.default, (c["x"], c["weight"], c["bias"], c["positions"])
    if method == "lora":
        return ops.token_subset_lora_linear.default, (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"],
                                                      SCALE, p, seed, c["positions"])
    return ops.token_subset_vera_linear.default, (c["x"], c["weight"], c["bias"], c["vera_a"], c["vera_b"],
                                                  c["lambda_d"], c["lambda_b"], p, seed, c["positions"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(device, method, p, bias):
    c = with_grad(make_case(dtype=torch.float32, device=device, bias=bias), METHODS[method].trained)
    op, args = forward_args(method, c, p)
    opcheck(op, args)


def backward_args(method, c, x_rows, mask, p=0.25):
    B, k = c["positions"].shape
    dev, dt = c["x"].device, c["x"].dtype
    gy = torch.randn(B, c["x"].shape[1], c["weight"].shape[0], dtype=dt, device=dev)
    u_rows = torch.randn(B * k, c["lora_a"].shape[0], dtype=dt, device=dev)
    seed = torch.tensor(3, device=dev)
    if method == "linear":
        return ops.token_subset_linear_backward.default, (gy, x_rows, c["weight"], c["positions"], mask[:3])
    if method == "lora":
        return ops.token_subset_lora_linear_backward.default, (gy, x_rows, c["weight"], c["lora_a"], c["lora_b"],
                                                               u_rows, SCALE, p, seed, c["positions"], mask)
    return ops.token_subset_vera_linear_backward.default, (gy, x_rows, c["weight"], c["vera_a"], c["vera_b"],
                                                           c["lambda_d"], c["lambda_b"], u_rows, p, seed,
                                                           c["positions"], mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask", [[True] * 5, [True, False, False, True, True], [False, True, True, False, False],
                                  [True, False, False, False, True]])
def test_opcheck_backward(device, method, mask):
    c = make_case(dtype=torch.float32, device=device)
    B, k = c["positions"].shape
    x_rows = torch.randn(B * k, c["x"].shape[2], device=device)
    opcheck(*backward_args(method, c, x_rows, mask))
    values_needed = mask[1] or (method == "lora" and mask[3])
    if not values_needed:  # x_rows not saved: the empty [0] stand-in
        opcheck(*backward_args(method, c, torch.empty(0, device=device), mask))


# --- gradcheck ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(method, p):
    """The op's gradients are the true Jacobian of y at the selected tokens
    with respect to x at the selected tokens and the parameters, the other
    tokens of x held constant (the full Jacobian is not: by design the
    unselected tokens' computations are constants)."""
    case = make_case(B=2, T=4, k=2, n_in=5, n_out=3, r=2)
    m = METHODS[method]
    params = [k for k in m.trained if k != "x"]
    pos = case["positions"]
    x_index = pos.unsqueeze(-1).expand(-1, -1, 5)
    y_index = pos.unsqueeze(-1).expand(-1, -1, 3)

    def fn(x_selected, *tensors):
        x = case["x"].scatter(1, x_index, x_selected)
        y = m.ours(dict(case, x=x, **dict(zip(params, tensors))), p, 11)
        return y.gather(1, y_index)

    inputs = [case["x"].gather(1, x_index)] + [case[k] for k in params]
    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in inputs])


def test_second_order_gradients_fail_loudly():
    c = with_grad(make_case(), Lora.trained)
    gx, = torch.autograd.grad(Lora.ours(c, 0.0, 0).sum(), c["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        gx.sum().backward()


def test_vera_shared_matrices_must_be_frozen():
    c = with_grad(make_case(), ("x", "vera_a", "lambda_d"))
    with pytest.raises(RuntimeError, match="vera_a and vera_b are frozen"):
        Vera.ours(c, 0.0, 0).sum().backward()


def test_gathered_rows_carry_no_gradient():
    """x_rows / u_rows are outputs only to be saved: marked non-differentiable,
    so a loss on them cannot silently get a wrong gradient."""
    c = with_grad(make_case(), Lora.trained)
    _, args = forward_args("lora", c, 0.0)
    y, x_rows, u_rows = ops.token_subset_lora_linear(*args)
    assert y.requires_grad and not x_rows.requires_grad and not u_rows.requires_grad


# --- torch.compile and TorchScript ----------------------------------------------------------

def check_compiled(method, backend):
    torch._dynamo.reset()
    m = METHODS[method]
    trained = [k for k in m.trained if k != "x"]

    def step(x, positions, seed, *params):
        c = dict(base, x=x, positions=positions, **dict(zip(trained, params)))
        return (m.ours(c, 0.1, seed).float() ** 2).mean()

    base = with_grad(make_case(dtype=torch.float32), trained)
    params = [base[k] for k in trained]
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(3)
    for B, T, k, seed in [(2, 6, 3, 3), (3, 9, 4, 4)]:  # a second shape and seed
        x = torch.randn(B, T, 8, requires_grad=True)
        pos = random_positions(B, T, k, g)
        loss = compiled(x, pos, torch.tensor(seed), *params)
        got = torch.autograd.grad(loss, [x, *params])
        want_loss = step(x, pos, torch.tensor(seed), *params)
        want = torch.autograd.grad(want_loss, [x, *params])
        torch.testing.assert_close(loss, want_loss)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_compile_fullgraph_forward_backward(method):
    check_compiled(method, "aot_eager")


@pytest.mark.slow
def test_compile_inductor():
    check_compiled("lora", "inductor")


def test_torchscript_function_calls_the_op():
    @torch.jit.script
    def scripted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bb: torch.Tensor,
                 seed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.ops.pypeft.token_subset_lora_linear(x, w, b, a, bb, 0.5, 0.2, seed, positions)[0]

    c = make_case(dtype=torch.float32)
    assert "pypeft::token_subset_lora_linear" in str(scripted.graph)
    got = scripted(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], torch.tensor(8), c["positions"])
    want = R.lora_linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 0.5, 0.2, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- bad input -----------------------------------------------------------------------------

BAD_POSITIONS = {
    "int32": (torch.tensor([[0, 2], [1, 3]], dtype=torch.int32), TypeError, "int64"),
    "wrong batch": (torch.tensor([[0, 2]]), ValueError, "B = 2"),
    "1-D": (torch.tensor([0, 2]), ValueError, "2-D"),
    "negative": (torch.tensor([[0, -1], [1, 3]]), ValueError, "[0, 6)"),
    "past the end": (torch.tensor([[0, 6], [1, 3]]), ValueError, "[0, 6)"),
    "repeated in a row": (torch.tensor([[2, 2], [1, 3]]), ValueError, "distinct"),
    "more than T per row": (torch.arange(7).repeat(2, 1), ValueError, "at most 6"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", BAD_POSITIONS, ids=list(BAD_POSITIONS))
def test_bad_positions_name_the_argument(method, case):
    positions, exc, got = BAD_POSITIONS[case]
    c = make_case(B=2, T=6, dtype=torch.float32)
    c["positions"] = positions
    op, args = forward_args(method, c, 0.1)
    with pytest.raises(exc) as info:
        op(*args)
    msg = str(info.value)
    assert "token_subset" in msg and "'positions'" in msg and "expected" in msg and got in msg, msg


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(12, 8), (2, 6, 1, 8)], ids=["2-D", "4-D"])
def test_x_must_be_batch_tokens_features(method, shape):
    c = make_case(B=2, T=6, dtype=torch.float32)
    c["x"] = torch.randn(*shape)
    op, args = forward_args(method, c, 0.0)
    with pytest.raises(ValueError, match="argument 'x': expected a 3-D tensor \\[batch, tokens, in_features\\]"):
        op(*args)


@pytest.mark.parametrize("method", METHODS)
def test_bad_adapter_and_layer_args_name_this_op(method):
    c = make_case(B=2, T=6, dtype=torch.float32)
    c["weight"] = torch.randn(5, 7)
    op, args = forward_args(method, c, 0.0)
    with pytest.raises(ValueError, match="token_subset.*argument '(x|vera_a)'.*expected"):
        op(*args)
    c = make_case(B=2, T=6, dtype=torch.float32)
    c["bias"] = torch.randn(5, dtype=torch.float64)
    op, args = forward_args(method, c, 0.0)
    with pytest.raises(TypeError, match="token_subset.*argument 'bias'.*Double"):
        op(*args)


@pytest.mark.parametrize("method", METHODS)
def test_bad_backward_input_names_the_argument(method):
    c = make_case(dtype=torch.float32)
    op, args = backward_args(method, c, torch.empty(0), [True] * 5)
    with pytest.raises(ValueError, match="_backward: argument 'x_rows': expected shape \\[6, 8\\]"):
        op(*args)  # grad_weight needs the rows' values
    op, args = backward_args(method, c, torch.randn(6, 8), [True] * 5)
    with pytest.raises(ValueError, match="argument 'grad_y'.*5"):
        op(torch.randn(2, 6, 4), *args[1:])
    if method != "linear":
        bad_u = list(args)
        bad_u[5 if method == "lora" else 7] = torch.randn(6, 2)
        with pytest.raises(ValueError, match="argument 'u_rows': expected shape \\[6, 3\\]"):
            op(*bad_u)


@requires_cuda
@pytest.mark.parametrize("method", METHODS)
def test_positions_on_another_device(method):
    c = make_case(device="cuda", dtype=torch.float32)
    c["positions"] = c["positions"].cpu()
    op, args = forward_args(method, c, 0.0)
    with pytest.raises(ValueError, match="'positions'.*cuda"):
        op(*args)
