"""The lifecycle of a patched model under the ways serving and training code
really uses it: models in eval() (as from_pretrained returns them), many
adapter switches on merged low-precision weights, nested context managers,
and two threads sharing one model — each against a serial or unpatched
reference."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import pypeft
import tiny_models as T
from pypeft.methods.lora import LoraLinear


def randomize(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def two_adapters(family="bert", method="lora", **options):
    model = T.make(family)
    options = options or ({"r": 4, "alpha": 8} if method == "lora" else {"r": 8} if method == "vera" else {})
    for i, name in enumerate(["a", "b"]):
        pypeft.patch(model, method=method, adapter_name=name, **options)
        randomize(model, seed=i)
    return model


# --- eval() is kept ----------------------------------------------------------------------

@pytest.mark.parametrize("method, options", [("lora", dict(r=4, dropout=0.5)), ("vera", dict(r=8, dropout=0.5)),
                                             ("read", dict(hidden=8)), ("tokentune", dict(k=2))])
def test_patching_an_eval_model_keeps_it_in_eval(method, options):
    model = T.make("bert").eval()
    pypeft.patch(model, method=method, **options)
    if method != "tokentune":
        randomize(model)
    assert not any(m.training for m in model.modules()), [n for n, m in model.named_modules() if m.training]
    batch = T.inputs("bert")
    assert torch.equal(T.output(model, batch), T.output(model, batch))  # no adapter dropout at inference
    model.train()  # and train() still reaches every new module
    assert all(m.training for m in model.modules())


def test_patching_a_training_model_keeps_it_training():
    model = T.make("bert").train()
    pypeft.patch(model, method="lora", r=4)
    assert all(m.training for m in model.modules())


# --- merged weights survive any number of switches exactly ----------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_merged_adapters_leaves_base_weights_bit_exact(dtype):
    model = T.make("llama").to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(["a", "b", "c"]):
        pypeft.patch(model, method="lora", r=4, alpha=8, adapter_name=name, target_modules="all-linear")
        randomize(model, seed=i, scale=1.0)
    batch = T.inputs("llama")
    pypeft.merge(model)
    merged_c = T.output(model, batch)
    for i in range(100):
        pypeft.set_adapter(model, ["a", "b"][i % 2])
        with pypeft.disabled(model):
            pass
    pypeft.set_adapter(model, "c")
    assert torch.equal(T.output(model, batch), merged_c)  # the same merge as before, bit for bit
    pypeft.delete_adapter(model, "a")
    pypeft.unmerge(model)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)):
        assert torch.equal(layer.base_layer.weight, original[f"{name}.weight"]), name
    pypeft.unpatch(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_merge_unmerge_cycles_restore_the_layer_exactly(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(dtype)
    weight = base.weight.detach().clone()
    layer = LoraLinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    for _ in range(50):
        layer.merge()
        assert not torch.equal(layer.base_layer.weight, weight)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, weight)


def test_training_a_merged_model_warns():
    model = pypeft.patch(T.make("bert"), method="lora", r=4)
    pypeft.merge(model)
    model.train()
    with pytest.warns(UserWarning, match="merged adapters.*no gradient.*unmerge"):
        model(**T.labels_for("bert", T.inputs("bert"))).loss.backward()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.output(model, T.inputs("bert"))  # inference on a merged model is what merging is for


# --- context managers restore what they found ------------------------------------------------

def test_disabled_nests():
    model = two_adapters()
    batch = T.inputs("bert")
    adapted = T.output(model, batch)
    with pypeft.disabled(model):
        base = T.output(model, batch)
        with pypeft.disabled(model):
            assert torch.equal(T.output(model, batch), base)
        assert torch.equal(T.output(model, batch), base)  # the inner exit did not re-enable
    assert torch.equal(T.output(model, batch), adapted)


def test_mixed_batch_nests_and_composes_with_disabled():
    model = two_adapters().eval()
    batch = T.inputs("bert", batch=2)
    with pypeft.mixed_batch(model, ["a", "b"]):
        outer = T.output(model, batch)
        with pypeft.mixed_batch(model, ["b", "b"]):
            inner = T.output(model, batch)
        assert torch.equal(T.output(model, batch), outer)  # the inner exit restored the outer rows
        with pypeft.disabled(model):
            base = T.output(model, batch)
        assert torch.equal(T.output(model, batch), outer)
    pypeft.set_adapter(model, "b")
    torch.testing.assert_close(inner, T.output(model, batch), atol=1e-5, rtol=1e-5)
    with pypeft.disabled(model):
        assert torch.equal(base, T.output(model, batch))


def test_merged_model_in_nested_blocks_is_merged_again_only_at_the_end():
    model = two_adapters()
    batch = T.inputs("bert")
    pypeft.merge(model)
    merged = T.output(model, batch)
    with pypeft.disabled(model):
        with pypeft.disabled(model):
            pass
        assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))
        base = T.output(model, batch)
    assert all(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    assert torch.equal(T.output(model, batch), merged)
    assert not torch.equal(base, merged)


# --- two threads, one model --------------------------------------------------------------------

class Rendezvous:
    """A forward hook that holds each thread inside the model until the other
    one is inside too, so their forwards overlap for certain."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=30)

    def __call__(self, *unused):
        self.barrier.wait()


def run_in_threads(jobs):
    results, errors = [None] * len(jobs), []

    def run(i):
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_two_threads_serving_mixed_batches_get_their_own_rows(method):
    model = two_adapters(method=method).eval()
    batch = T.inputs("bert", batch=2)
    jobs_rows = [["a", "b"], ["b", "base"]]
    serial = []
    for rows in jobs_rows:
        with pypeft.mixed_batch(model, rows):
            serial.append(T.output(model, batch))
    hook = model.bert.encoder.layer[0].register_forward_hook(Rendezvous(2))

    def job(rows):
        def run():
            outs = []
            for _ in range(3):
                with pypeft.mixed_batch(model, rows):
                    outs.append(T.output(model, batch))
            return outs
        return run

    try:
        results = run_in_threads([job(rows) for rows in jobs_rows])
    finally:
        hook.remove()
    for want, outs in zip(serial, results):
        for got in outs:
            assert torch.equal(got, want)


def test_disabled_in_one_thread_leaves_the_other_adapted():
    model = two_adapters()
    batch = T.inputs("bert")
    adapted = T.output(model, batch)
    with pypeft.disabled(model):
        base = T.output(model, batch)
    hook = model.bert.encoder.layer[0].register_forward_hook(Rendezvous(2))

    def disabled_run():
        with pypeft.disabled(model):
            return T.output(model, batch)

    try:
        got_base, got_adapted = run_in_threads([disabled_run, lambda: T.output(model, batch)])
    finally:
        hook.remove()
    assert torch.equal(got_base, base) and torch.equal(got_adapted, adapted)


def test_two_threads_running_read_get_their_own_corrections():
    model = T.make("bert")
    pypeft.patch(model, method="read", hidden=8)
    randomize(model, scale=0.5)
    batches = [T.inputs("bert", batch=2, length=7, seed=1), T.inputs("bert", batch=3, length=5, seed=2)]
    serial = [T.output(model, b) for b in batches]
    # the rendezvous sits on a layer READ reads, between two of its collecting hooks
    hook = model.bert.encoder.layer[0].register_forward_hook(Rendezvous(2))
    try:
        results = run_in_threads([lambda b=b: T.output(model, b) for b in batches])
    finally:
        hook.remove()
    for got, want in zip(results, serial):
        assert torch.equal(got, want)


# --- arguments that are not what patch expects ------------------------------------------------------

def test_patch_needs_a_module():
    with pytest.raises(TypeError, match=r"pypeft.patch: argument 'model': expected a torch.nn.Module, got str"):
        pypeft.patch("model", method="lora")


@pytest.mark.parametrize("method, options", [("lora", {}), ("vera", dict(r=8)), ("tokentune", dict(k=2))])
def test_float16_on_the_cpu_is_refused_at_patch_time(method, options):
    model = T.make("bert").half()
    with pytest.raises(ValueError, match=r"argument 'model'.*float16 on the CPU.*model.cuda\(\)"):
        pypeft.patch(model, method=method, **options)
    assert "pypeft" not in model.__dict__ and all(p.requires_grad for p in model.parameters())


def test_bfloat16_on_the_cpu_patches_and_runs():
    model = T.make("bert").to(torch.bfloat16)
    pypeft.patch(model, method="lora", r=4)
    randomize(model)
    assert torch.isfinite(T.output(model, T.inputs("bert"))).all()
