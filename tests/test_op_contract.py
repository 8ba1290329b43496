"""The op contract (DESIGN.md, "The op contract") over every op in
tests/op_table.py, on the CPU and, when present, CUDA:

- torch.library.opcheck (schema, autograd registration, fake tensor, AOT
  dispatch with dynamic shapes) on every sample;
- the op's outputs and gradients against its reference (tests/reference.py)
  in float64 on every sample; the gradients of token-subset ops are exactly
  zero at the unselected tokens;
- gradcheck in float64 (token-subset ops: with respect to the selected tokens);
- torch.compile(fullgraph=True) forward and backward against eager;
- torch.jit.script of a function that calls the op;
- no double backward: a second-order gradient raises (counter_dropout, which
  is linear, has one: gradgradcheck); ops without a gradient raise in backward;
- what autograd saves, in bytes of distinct storages;
- bad input: every case of the op's table raises at once, naming the
  argument, on the real kernel and under FakeTensor; and every tensor
  argument moved to another device (a meta tensor beside CPU tensors too)
  raises, naming it.

An entry's samples include its other argument forms (the adapter ops over an
NF4 base weight); the per-op checks (TorchScript, saved bytes, second order,
devices) run on each form's sample (OpInfo.forms).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import reference as R
import saved_tensors
from conftest import DEVICES
from op_table import BY_NAME, F32, F64, OPS, OpInfo

FORWARD = [info for info in OPS if not info.is_backward]


@functools.cache
def _samples(info: OpInfo):
    """(name, big) of the entry's samples, made once at collection."""
    return tuple((s.name, s.big) for s in info.samples("cpu", F64))


def sample_params(infos=OPS, small_only=False):
    return [pytest.param(info, name, id=f"{info.name}-{name}") for info in infos for name, big in _samples(info)
            if not (small_only and big)]


def op_params(infos):
    return [pytest.param(info, id=info.name) for info in infos]


def as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def outputs(info: OpInfo, out):
    """The op's compared outputs, as a tuple."""
    return as_tuple(info.output(out))


def leaves(args: dict, names) -> dict:
    """args with the named tensors as fresh leaves requiring grad (same storage)."""
    return {k: v.detach().requires_grad_() if k in names and v is not None else v for k, v in args.items()}


def to_cpu64(args: dict) -> dict:
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().double() if v.is_floating_point() else v.cpu()
        if isinstance(v, list):
            return [conv(t) for t in v]
        return v

    return {k: conv(v) for k, v in args.items()}


def call(info: OpInfo, args: dict):
    return info.op(*args.values())


def tensor_args(args: dict):
    """(name in messages, path) for every tensor argument, list elements included."""
    out = []
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            out.append((k, (k, None)))
        elif isinstance(v, list):
            out += [(f"{k}[{i}]", (k, i)) for i, t in enumerate(v) if isinstance(t, torch.Tensor)]
    return out


def replaced(args: dict, path, fn) -> dict:
    key, index = path
    out = dict(args)
    if index is None:
        out[key] = fn(args[key])
    else:
        out[key] = list(args[key])
        out[key][index] = fn(args[key][index])
    return out


# --- opcheck ------------------------------------------------------------------------------

def is_core(info, sample):
    return info.core is None or sample in info.core


# Tracing with dynamic shapes (test_aot_dispatch_dynamic) costs seconds a call
# and depends little on the sizes: the entry's core samples get it, every
# sample gets the rest of opcheck.
CHEAP_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")
FULL_OPCHECK = CHEAP_OPCHECK + ("test_aot_dispatch_dynamic",)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info, sample", sample_params(small_only=True))
def test_opcheck(info, sample, device):
    s = info.sample(sample, device, F32)
    utils = FULL_OPCHECK if is_core(info, sample) else CHEAP_OPCHECK
    if info.inference_only:
        opcheck(info.op, tuple(s.args.values()), test_utils=utils)
        # With an input requiring grad: the autograd formula is registered (it
        # raises, so the AOT check, which runs backward, is left out).
        opcheck(info.op, tuple(leaves(s.args, ("x",)).values()), test_utils=CHEAP_OPCHECK)
        return
    opcheck(info.op, tuple(leaves(s.args, s.grad).values()), test_utils=utils)


def test_opcheck_float64():
    info = BY_NAME["lora_linear"]
    s = info.sample("basic", "cpu", F64)
    opcheck(info.op, tuple(leaves(s.args, s.grad).values()))


# --- against the reference ------------------------------------------------------------------

def assert_matches_reference(info: OpInfo, s, atol, rtol):
    ours = leaves(s.args, s.grad)
    theirs = leaves(to_cpu64(s.args), s.grad)
    ys = outputs(info, call(info, ours))
    refs = as_tuple(info.reference(theirs))
    assert len(ys) == len(refs)
    for y, ref in zip(ys, refs):
        assert y.shape == ref.shape and y.dtype == s.args[next(iter(s.args))].dtype, (y.shape, ref.shape, y.dtype)
        torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), atol=atol, rtol=rtol)
    if not s.grad:
        return
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(ref.shape, generator=g, dtype=F64) for ref in refs]
    wrt = [ours[k] for k in s.grad]
    got = torch.autograd.grad(ys, wrt, [c.to(y) for c, y in zip(cotangents, ys)], allow_unused=True)
    if any(ref.requires_grad for ref in refs):
        want = torch.autograd.grad([r for r in refs if r.requires_grad],
                                   [theirs[k] for k in s.grad],
                                   [c for c, r in zip(cotangents, refs) if r.requires_grad], allow_unused=True)
    else:  # the reference's graph is empty (no steps, no rows): nothing reaches the inputs
        want = [None] * len(s.grad)
    for name, a, b in zip(s.grad, got, want):
        t = ours[name]
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros(t.shape, dtype=F64) if b is None else b
        assert a.dtype == t.dtype and a.shape == t.shape, name
        torch.testing.assert_close(a.cpu().double(), b, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")
    for name in info.tokens:  # TokenTune: unselected tokens get no gradient at all
        grad = got[s.grad.index(name)]
        unselected = ~R.token_mask(s.args["positions"].cpu(), grad.shape[info.token_dim])
        at = grad.cpu().movedim(info.token_dim, 1)
        assert torch.all(at[unselected] == 0), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info, sample", sample_params([i for i in OPS if i.reference is not None]))
def test_matches_reference(info, sample, device):
    s = info.sample(sample, device, F64)
    assert_matches_reference(info, s, **info.tolerance)


# --- gradcheck ---------------------------------------------------------------------------------

GRADCHECK_MAX_ELEMENTS = 600


def gathered(t, positions, dim):
    """t's selected tokens (dim `dim`, per batch row)."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = positions.shape
    index = positions.view(shape).expand(*t.shape[:dim], positions.shape[1], *t.shape[dim + 1:])
    return t.gather(dim, index), index




def gradcheck_function(info: OpInfo, s):
    """(fn, inputs): the op as a function of the sample's grad arguments; for
    token-subset ops, of the selected tokens' values of the token arguments
    (the others held constant), with the output at the selected tokens: that
    Jacobian is exactly what their backward computes."""
    names = list(s.grad)
    base = dict(s.args)

    def dense(t):  # gradcheck perturbs inputs in place: no stride-0 inputs
        return t.contiguous() if torch._debug_has_internal_overlap(t) == 1 else t

    if not info.tokens:
        def fn(*ts):
            return outputs(info, call(info, {**base, **dict(zip(names, ts))}))

        return fn, [dense(base[k]).detach().clone().requires_grad_() for k in names]

    pos, dim = base["positions"], info.token_dim

    def fn(*ts):
        args = dict(base)
        for k, t in zip(names, ts):
            if k in info.tokens:
                _, index = gathered(base[k], pos, dim)
                t = base[k].detach().scatter(dim, index, t)
            args[k] = t
        return tuple(gathered(y, pos, dim)[0] for y in outputs(info, call(info, args)))

    inputs = [gathered(base[k], pos, dim)[0] if k in info.tokens else dense(base[k]) for k in names]
    return fn, [t.detach().clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("info, sample", sample_params([i for i in FORWARD if i.double_backward], small_only=True))
def test_gradcheck(info, sample):
    s = info.sample(sample, "cpu", F64)
    assert s.grad and sum(s.args[k].numel() for k in s.grad) <= GRADCHECK_MAX_ELEMENTS, \
        "a sample too big for gradcheck must be marked big"
    fn, inputs = gradcheck_function(info, s)
    # The full Jacobian for the core samples; the others one random direction of it.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=not is_core(info, sample))


# --- torch.compile --------------------------------------------------------------------------------

def loss_of(info, out):
    return sum((y.float() ** 2).mean() for y in outputs(info, out))


def check_compiled(info: OpInfo, device, backend):
    torch._dynamo.reset()

    def step(*args):
        return loss_of(info, info.op(*args))

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    for name in info.compile:
        s = info.sample(name, device, F32)
        if info.inference_only:
            with torch.no_grad():
                torch.testing.assert_close(compiled(*s.args.values()), step(*s.args.values()))
            continue
        args = leaves(s.args, s.grad)
        loss, want = compiled(*args.values()), step(*args.values())
        torch.testing.assert_close(loss, want)
        wrt = [args[k] for k in s.grad]
        for a, b in zip(torch.autograd.grad(loss, wrt), torch.autograd.grad(want, wrt)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", op_params([i for i in OPS if i.compile]))
def test_compile_fullgraph_aot_eager(info, device):
    check_compiled(info, device, "aot_eager")


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name, marks=() if i.name == "token_subset_attention"
                                               else pytest.mark.slow) for i in OPS if i.inductor])
def test_compile_fullgraph_inductor(info):
    check_compiled(info, "cpu", "inductor")


def test_wrong_shape_fails_when_torch_compile_traces():
    """The fake kernel checks every argument: a wrong lora_a width fails while
    torch.compile traces, naming the argument, before any graph is made (it
    used to trace fine and fail only when the real kernel ran)."""
    torch._dynamo.reset()
    info = BY_NAME["lora_linear"]
    args = dict(info.sample("basic", "cpu", F32).args)
    args["lora_a"] = torch.randn(3, 7)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # (With dynamic shapes the message names the symbolic in_features.)
    with pytest.raises(Exception, match=r"pypeft.lora_linear: argument 'lora_a': expected size \S+ in dim 1 "
                                        r"\(in_features, from weight \[out, in\]\), got shape \[\S+, \S+\]"):
        torch.compile(lambda *a: info.op(*a)[0], backend=backend, fullgraph=True, dynamic=True)(*args.values())
    assert not graphs


# --- TorchScript ------------------------------------------------------------------------------------

def scripted(info: OpInfo):
    """A TorchScript function calling the op with every argument, written from
    its schema (defaults included, so that samples may leave them out)."""
    schema = info.op._schema
    params = ", ".join(f"{a.name}: {a.type.annotation_str}" + (f" = {a.default_value!r}" if a.has_default_value()
                                                                else "") for a in schema.arguments)
    names = ", ".join(a.name for a in schema.arguments)
    source = f"def call({params}):\n    return torch.ops.pypeft.{info.name}({names})\n"
    return torch.jit.CompilationUnit(source).call


def assert_same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif a is None:
        assert b is None
    else:
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", op_params(OPS))
def test_torchscript(info, device):
    fn = scripted(info)
    assert f"pypeft::{info.name}" in str(fn.graph)
    with torch.no_grad():
        # A sample whose outputs are all defined: TorchScript called from
        # Python cannot hand back the undefined tensors of outputs not asked for.
        for s in info.samples(device, F32):
            want = call(info, s.args)
            if not s.big and all(t is not None for t in as_tuple(want)):
                break
        else:
            raise AssertionError("no sample with every output defined")
        assert_same(fn(*s.args.values()), want)
        for form in info.forms[1:]:  # the other forms of the arguments (an NF4 base weight)
            args = info.sample(form, device, F32).args
            assert_same(fn(*args.values()), call(info, args))


# --- no double backward; no backward at all for inference-only ops --------------------------------------

def form_params(infos):
    """(info, form) for each form of the entries' arguments (basic, an NF4 base weight)."""
    return [pytest.param(info, form, id=info.name if form == "basic" else f"{info.name}-{form}")
            for info in infos for form in info.forms]


@pytest.mark.parametrize("info, form", form_params([i for i in OPS if i.double_backward == "raises"]))
def test_second_order_gradients_raise(info, form):
    s = info.sample(form, "cpu", F64)
    args = leaves(s.args, s.grad)
    for wrt in s.grad:  # each input's gradient: none may be differentiated again
        if wrt in info.passthrough:
            continue
        loss = sum(y.pow(2).sum() for y in outputs(info, call(info, args)))
        (g,) = torch.autograd.grad(loss, args[wrt], create_graph=True)
        assert g.requires_grad, wrt
        with pytest.raises(RuntimeError, match="second-order gradients"):
            g.sum().backward()


@pytest.mark.parametrize("info", op_params([i for i in OPS if i.double_backward == "works"]))
def test_second_order_gradients_where_supported(info):
    s = info.sample("basic", "cpu", F64)
    fn, inputs = gradcheck_function(info, s)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("info", op_params([i for i in OPS if i.inference_only]))
def test_backward_of_an_inference_only_op_raises(info):
    args = info.sample("basic", "cpu", F32).args
    for name, path in tensor_args(args):
        y = call(info, replaced(args, path, lambda t: t.detach().requires_grad_()))
        assert y.requires_grad, name
        with pytest.raises(RuntimeError, match=re.escape(info.inference_only)):
            y.sum().backward()


# --- what autograd saves ---------------------------------------------------------------------------------

@pytest.mark.parametrize("info, form", form_params([i for i in OPS if i.saved is not None]))
def test_saved_bytes(info, form):
    spec = info.saved
    s = info.sample(spec.sample if form == "basic" else form, "cpu", F32)
    # The training configuration, less what cannot take a gradient in this form (an NF4 weight's codes).
    grad = tuple(k for k in spec.grad if not isinstance(s.args.get(k), torch.Tensor) or s.args[k].is_floating_point())
    args = leaves(s.args, grad)
    params = [args[k] for k in info.params if isinstance(args.get(k), torch.Tensor)]
    with saved_tensors.saved(exclude=params) as record:
        out = call(info, args)
    assert record.nbytes == spec.nbytes(args), record.shapes()
    loss_of(info, out).backward()
    assert all(args[k].grad is not None for k in grad if args.get(k) is not None)


# --- bad input -------------------------------------------------------------------------------------------

def bad_params(under_fake: bool = False):
    """(info, bad, device) for every bad input on every device where it is
    bad; under_fake: only those a fake kernel can tell (not positions'
    values, which only the real kernels read)."""
    return [pytest.param(info, bad, device, id=f"{info.name}-{bad.name}-{device}")
            for info in OPS for bad in info.bad for device in DEVICES
            if (device == "cpu" or not bad.cpu_only) and (bad.fake or not under_fake)]


def bad_args(info, bad, device):
    args = dict(info.sample("basic", device, F32).args)
    args.update(bad.change(args))
    return args


def assert_names(info, bad, error):
    msg = str(error)
    assert f"pypeft.{info.name}: argument '{bad.arg}': expected " in msg and bad.words in msg, msg


@pytest.mark.parametrize("info, bad, device", bad_params())
def test_bad_input_names_the_argument(info, bad, device):
    args = bad_args(info, bad, device)
    with pytest.raises(bad.error) as error:
        call(info, args)
    assert_names(info, bad, error.value)


def fake_args(mode, args):
    def conv(v):
        if isinstance(v, torch.Tensor):
            return mode.from_tensor(v)
        if isinstance(v, list):
            return [conv(t) for t in v]
        return v

    return {k: conv(v) for k, v in args.items()}


@pytest.mark.parametrize("info, bad, device", bad_params(under_fake=True))
def test_bad_input_fails_under_fake_tensor(info, bad, device):
    """The fake kernel (what torch.compile traces) rejects what the real one
    does, with the same message; positions' values are the real kernels' alone."""
    mode = FakeTensorMode()
    args = fake_args(mode, bad_args(info, bad, device))
    with mode, pytest.raises(bad.error) as error:
        call(info, args)
    assert_names(info, bad, error.value)


def device_params():
    out = []
    for device in DEVICES:
        others = ["meta"] if device == "cpu" else ["cpu", "meta"]
        for info in OPS:
            for form in info.forms:
                label = info.name if form == "basic" else f"{info.name}-{form}"
                for name, path in tensor_args(info.sample(form, "cpu", F32).args):
                    for other in others:
                        if other == "cpu" and path[0] in info.cpu_args:
                            continue
                        out.append(pytest.param(info, form, name, path, device, other,
                                                id=f"{label}-{name}-{device}-{other}"))
    return out


@pytest.mark.parametrize("info, form, name, path, device, other", device_params())
def test_argument_on_another_device_is_named(info, form, name, path, device, other):
    """Every tensor argument must be on x's device. A meta tensor beside CPU
    tensors dispatches to the fake kernel: it must raise, not hand back
    uninitialised memory."""
    args = replaced(info.sample(form, device, F32).args, path, lambda t: t.to(other))
    others = [n for n, p in tensor_args(args) if p != path and p[0] not in info.cpu_args]
    if not others:  # x alone moved, beside a seed on the CPU: nothing is on another device
        assert all(t.device.type == other for t in as_tuple(call(info, args)) if t is not None)
        return
    with pytest.raises(ValueError) as error:
        call(info, args)
    msg = str(error.value)
    assert "expected a tensor on " in msg and ", got a tensor on " in msg, msg
    # It names the argument moved, or names it as the device every other one must be on.
    assert f"argument '{name}': " in msg or f"(the device of '{name}')" in msg, msg
