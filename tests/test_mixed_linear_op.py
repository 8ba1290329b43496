"""pypeft::lora_linear_mixed and pypeft::vera_linear_mixed (mixed-adapter
batches, inference only): what is particular to them (the op contract runs
from tests/op_table.py in test_op_contract.py). Random shapes and assignments
against tests/reference.py, base rows bit for bit F.linear, each row equal to
lora_linear / vera_linear alone, both GEMM plans, a changing assignment under
torch.compile, no_grad / inference_mode, CUDA against the CPU."""

from typing import List

import random

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import reference as R
from conftest import DEVICES, requires_cuda
from pypeft.ops import lora_linear, lora_linear_mixed, vera_linear, vera_linear_mixed

lora_op = torch.ops.pypeft.lora_linear_mixed.default
vera_op = torch.ops.pypeft.vera_linear_mixed.default


def _rnd(g, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def lora_inputs(batch=7, middle=(3,), n_in=10, n_out=6, ranks=(2, 5, 1), dtype=torch.float32,
                adapter_dtypes=None, device="cpu", bias=True, seed=0):
    """adapter_dtypes: one dtype per adapter (default: x's)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtypes = adapter_dtypes or [dtype] * len(ranks)
    return dict(
        x=_rnd(g, batch, *middle, n_in, dtype=dtype, device=device),
        weight=_rnd(g, n_out, n_in, dtype=dtype, device=device),
        bias=_rnd(g, n_out, dtype=dtype, device=device) if bias else None,
        lora_a=[_rnd(g, r, n_in, dtype=dt, device=device) for r, dt in zip(ranks, adapter_dtypes)],
        lora_b=[_rnd(g, n_out, r, dtype=dt, device=device) for r, dt in zip(ranks, adapter_dtypes)],
        scale=[0.5 + 0.75 * k for k in range(len(ranks))],
    )


def vera_inputs(batch=7, middle=(3,), n_in=10, n_out=6, r=4, adapters=3, extra_in=3, extra_out=2,
                dtype=torch.float32, adapter_dtype=None, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    adt = adapter_dtype or dtype
    return dict(
        x=_rnd(g, batch, *middle, n_in, dtype=dtype, device=device),
        weight=_rnd(g, n_out, n_in, dtype=dtype, device=device),
        bias=_rnd(g, n_out, dtype=dtype, device=device) if bias else None,
        vera_a=_rnd(g, r, n_in + extra_in, dtype=adt, device=device),
        vera_b=_rnd(g, n_out + extra_out, r, dtype=adt, device=device),
        lambda_d=_rnd(g, adapters, r, dtype=adt, device=device),
        lambda_b=_rnd(g, adapters, n_out, dtype=adt, device=device),
    )


def as_double(inputs):
    return {k: ([t.double() for t in v] if k.startswith("lora_") else v.double() if torch.is_tensor(v) else v)
            for k, v in inputs.items()}


def assignment(kind, batch, adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "base":
        return [-1] * batch
    if kind == "one":
        return [adapters - 1] * batch
    if kind == "one, between base rows":
        return [adapters - 1 if b % 3 else -1 for b in range(batch)]
    ra = torch.randint(-1, adapters, (batch,), generator=g).tolist()
    return sorted(ra) if kind == "contiguous" else ra


# Every row a different case: scattered rows of adapters 0 and 1, a contiguous
# run of 2, base rows in between.
INTERLEAVED = [1, 0, -1, 1, 2, 2, 0]

OPS = {
    "lora": (lora_op, lora_inputs, R.lora_linear_mixed, lambda i: len(i["lora_a"])),
    "vera": (vera_op, vera_inputs, R.vera_linear_mixed, lambda i: i["lambda_d"].shape[0]),
}


def call(name, inputs, row_adapter):
    return OPS[name][0](*inputs.values(), row_adapter)


def check_base_rows_bitwise(y, inputs, row_adapter):
    base = F.linear(inputs["x"], inputs["weight"], inputs["bias"])
    for b, k in enumerate(row_adapter):
        if k < 0:
            assert torch.equal(y[b], base[b]), f"base row {b} differs from F.linear"


# --- against the reference ------------------------------------------------------

middle_dims = st.lists(st.integers(0, 3), max_size=2)  # 2-D x, T = 0, T = 1, 3-D, 4-D


@st.composite
def row_assignments(draw, batch, adapters):
    kind = draw(st.sampled_from(["random", "contiguous", "base", "one"]))
    if kind == "base":
        return [-1] * batch
    if kind == "one":
        return [draw(st.integers(0, adapters - 1))] * batch
    ra = draw(st.lists(st.integers(-1, adapters - 1), min_size=batch, max_size=batch))
    return sorted(ra) if kind == "contiguous" else ra


def strided(x):
    """The same values in a non-contiguous tensor (every other element of a wider last dim)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), batch=st.integers(0, 6), middle=middle_dims, n_in=st.integers(1, 12),
       n_out=st.integers(1, 12), ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5), bias=st.booleans(),
       non_contiguous=st.booleans())
def test_lora_matches_reference_random_shapes(data, batch, middle, n_in, n_out, ranks, bias, non_contiguous):
    i = lora_inputs(batch, tuple(middle), n_in, n_out, ranks, dtype=torch.float64, bias=bias)
    if non_contiguous:
        i["x"] = strided(i["x"])
    ra = data.draw(row_assignments(batch, len(ranks)))
    y = lora_op(*i.values(), ra)
    assert y.shape == (batch, *middle, n_out) and y.dtype == torch.float64
    torch.testing.assert_close(y, R.lora_linear_mixed(*i.values(), ra), atol=1e-10, rtol=1e-10)
    check_base_rows_bitwise(y, i, ra)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), batch=st.integers(0, 6), middle=middle_dims, n_in=st.integers(1, 12),
       n_out=st.integers(1, 12), r=st.integers(1, 8), adapters=st.integers(1, 5), extra_in=st.integers(0, 3),
       extra_out=st.integers(0, 3), bias=st.booleans(), non_contiguous=st.booleans())
def test_vera_matches_reference_random_shapes(data, batch, middle, n_in, n_out, r, adapters, extra_in, extra_out,
                                              bias, non_contiguous):
    i = vera_inputs(batch, tuple(middle), n_in, n_out, r, adapters, extra_in, extra_out, dtype=torch.float64,
                    bias=bias)
    if non_contiguous:
        i["x"] = strided(i["x"])
    ra = data.draw(row_assignments(batch, adapters))
    y = vera_op(*i.values(), ra)
    assert y.shape == (batch, *middle, n_out) and y.dtype == torch.float64
    torch.testing.assert_close(y, R.vera_linear_mixed(*i.values(), ra), atol=1e-10, rtol=1e-10)
    check_base_rows_bitwise(y, i, ra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("kind", ["random", "contiguous", "base", "one", "one, between base rows"])
def test_float32_matches_reference_and_base_rows_are_bitwise(device, name, kind):
    _, make, ref, adapters = OPS[name]
    i = make(batch=9, middle=(5,), n_in=24, n_out=20, device=device)
    ra = assignment(kind, 9, adapters(i), seed=3)
    y = call(name, i, ra)
    torch.testing.assert_close(y.double(), ref(*as_double(i).values(), ra), atol=1e-4, rtol=1e-4)
    check_base_rows_bitwise(y, i, ra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("row_adapter", [INTERLEAVED, sorted(INTERLEAVED)], ids=["interleaved", "contiguous"])
def test_bfloat16_x_with_float32_adapters(device, name, row_adapter):
    """bf16 activations beside fp32 adapters (for LoRA, mixed with a bf16 adapter)."""
    if name == "lora":
        i = lora_inputs(middle=(4,), n_in=32, n_out=24, ranks=(8, 4, 16), dtype=torch.bfloat16, device=device,
                        adapter_dtypes=[torch.float32, torch.bfloat16, torch.float32])
    else:
        i = vera_inputs(middle=(4,), n_in=32, n_out=24, r=16, dtype=torch.bfloat16, adapter_dtype=torch.float32,
                        device=device)
    y = call(name, i, row_adapter)
    assert y.dtype == torch.bfloat16
    want = OPS[name][2](*as_double(i).values(), row_adapter)
    torch.testing.assert_close(y.double(), want, atol=0.02 * want.abs().max().item(), rtol=0.02)
    check_base_rows_bitwise(y, i, row_adapter)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_x(name):
    _, make, ref, _ = OPS[name]
    i = make(batch=7, middle=(4,), n_in=6)
    for xn in (torch.randn(6, 4, 7).permute(2, 1, 0), torch.randn(14, 4, 6)[::2]):  # transposed; strided rows
        assert not xn.is_contiguous()
        i["x"] = xn
        y = call(name, i, INTERLEAVED)
        torch.testing.assert_close(y, ref(*i.values(), INTERLEAVED), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, call(name, {**i, "x": xn.contiguous()}, INTERLEAVED))
        check_base_rows_bitwise(y, i, INTERLEAVED)


def test_lora_without_adapters_is_the_base_layer():
    i = lora_inputs(ranks=())
    assert torch.equal(lora_op(*i.values(), [-1] * 7), F.linear(i["x"], i["weight"], i["bias"]))


def test_vera_with_zero_lambda_b_is_the_base_layer():
    i = vera_inputs()
    i["lambda_b"] = torch.zeros_like(i["lambda_b"])
    base = F.linear(i["x"], i["weight"], i["bias"])
    torch.testing.assert_close(vera_op(*i.values(), INTERLEAVED), base, atol=0, rtol=0)


# --- against the single-adapter ops, row by row ------------------------------------

@pytest.mark.parametrize("row_adapter", [INTERLEAVED, sorted(INTERLEAVED), [2] * 7])
def test_each_row_equals_lora_linear_alone(row_adapter):
    i = lora_inputs(n_in=16, n_out=12)
    y = lora_linear_mixed(*i.values(), row_adapter)
    for b, k in enumerate(row_adapter):
        want = (F.linear(i["x"][b], i["weight"], i["bias"]) if k < 0 else
                lora_linear(i["x"][b], i["weight"], i["bias"], i["lora_a"][k], i["lora_b"][k], i["scale"][k]))
        torch.testing.assert_close(y[b], want, atol=1e-5, rtol=1e-5)


# The op picks, per call, between one GEMM pair over all adapters stacked (few
# tokens: the shapes above) and a GEMM pair per adapter (long rows: these).
@pytest.mark.parametrize("row_adapter", [INTERLEAVED, sorted(INTERLEAVED), [0, 1, 0, 1, 2, 2, 1],
                                         [-1, 0, 0, 1, 1, 2, -1]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_rows_match_the_reference(row_adapter, dtype):
    i = lora_inputs(middle=(96,), n_in=384, n_out=320, ranks=(8, 4, 8), dtype=dtype)
    y = lora_linear_mixed(*i.values(), row_adapter)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(y, R.lora_linear_mixed(*i.values(), row_adapter), atol=tol, rtol=tol)
    check_base_rows_bitwise(y, i, row_adapter)


@pytest.mark.parametrize("row_adapter", [INTERLEAVED, sorted(INTERLEAVED), [2] * 7])
def test_each_row_equals_vera_linear_alone(row_adapter):
    i = vera_inputs(n_in=16, n_out=12)
    y = vera_linear_mixed(*i.values(), row_adapter)
    for b, k in enumerate(row_adapter):
        want = (F.linear(i["x"][b], i["weight"], i["bias"]) if k < 0 else
                vera_linear(i["x"][b], i["weight"], i["bias"], i["vera_a"], i["vera_b"], i["lambda_d"][k],
                            i["lambda_b"][k]))
        torch.testing.assert_close(y[b], want, atol=1e-5, rtol=1e-5)


# --- torch.compile: serving changes the assignment every batch -------------------------

def test_compile_fullgraph():
    torch._dynamo.reset()
    li, vi = lora_inputs(), vera_inputs()

    def serve(x, ra_lora: List[int], ra_vera: List[int]):
        h = lora_linear_mixed(x, li["weight"], li["bias"], li["lora_a"], li["lora_b"], li["scale"], ra_lora)
        return vera_linear_mixed(torch.relu(h).repeat(1, 1, 2)[..., :10], vi["weight"], vi["bias"], vi["vera_a"],
                                 vi["vera_b"], vi["lambda_d"], vi["lambda_b"], ra_vera)

    compiled = torch.compile(serve, backend="aot_eager", fullgraph=True)
    counter = torch._dynamo.testing.CompileCounter()
    counted = torch.compile(serve, backend=counter, fullgraph=True)
    rng = random.Random(0)
    with torch.no_grad():
        # Serving changes the assignment every batch: row_adapter is SymInt[], so
        # after one recompile it is dynamic (an int[] would recompile per
        # assignment and fail fullgraph past the recompile limit of 8).
        compiles = []
        for i in range(24):
            ra = [rng.randrange(-1, len(li["lora_a"])) for _ in INTERLEAVED]
            want = serve(li["x"], ra, ra[::-1])
            torch.testing.assert_close(counted(li["x"], ra, ra[::-1]), want)
            if i < 2:
                torch.testing.assert_close(compiled(li["x"], ra, ra[::-1]), want)
            compiles.append(counter.frame_count)
    assert compiles[11] <= 4 and compiles[-1] == compiles[11]  # a few recompiles, then none


@pytest.mark.parametrize("name", OPS)
def test_runs_under_no_grad_and_inference_mode(name):
    i = OPS[name][1]()
    i["x"].requires_grad_(True)
    want = call(name, i, INTERLEAVED).detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = call(name, i, INTERLEAVED)
        assert not y.requires_grad and torch.equal(y, want)


@requires_cuda
@pytest.mark.parametrize("name", OPS)
def test_cuda_matches_cpu(name):
    i = OPS[name][1](batch=7, middle=(33,), n_in=70, n_out=40, dtype=torch.float64)
    y_cpu = call(name, i, INTERLEAVED)
    cu = {k: ([t.cuda() for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0])
              else v.cuda() if torch.is_tensor(v) else v) for k, v in i.items()}
    torch.testing.assert_close(call(name, cu, INTERLEAVED).cpu(), y_cpu, atol=1e-10, rtol=1e-10)
