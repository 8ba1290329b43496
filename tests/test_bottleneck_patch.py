"""Bottleneck adapters (method="bottleneck") in a model's lifecycle: where they
sit, what trains, disabled/unpatch exactness, several adapters, mixed
batches, threads, copies, composition, saving and loading, bad input.
The math against the `adapters` library itself is tests/test_bottleneck_oracle.py."""

from __future__ import annotations

import copy
import json
import pickle
import threading

import pytest
import torch
from torch import nn

import pypeft
import tiny_models as T

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama"]
PRESETS = ["pfeiffer", "houlsby", "parallel"]


def randomize(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Non-zero adapter weights, so every path of the math shows in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".pypeft_bottleneck." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_up_projection_is_the_base_and_disabled_unpatch_restore_it(family, preset):
    model = T.make(family)
    batch = T.inputs(family)
    base = T.output(model, batch)
    names = sorted(model.state_dict())
    pypeft.patch(model, method="bottleneck", preset=preset, init_weights="mam_adapter")
    assert torch.equal(T.output(model, batch), base)  # the up projection starts at zero: exactly the base
    randomize(model)
    adapted = T.output(model, batch)
    assert (adapted - base).abs().max() > 1e-3
    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), base)
    assert torch.equal(T.output(model, batch), adapted)
    pypeft.unpatch(model)
    assert torch.equal(T.output(model, batch), base)
    assert sorted(model.state_dict()) == names
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sites_per_preset_and_leave_out(family):
    model = T.make(family)
    layers = 2
    pypeft.patch(model, method="bottleneck", preset="houlsby", leave_out=[0], adapter_name="h")
    sites = pypeft.state_of(model).adapters["h"].layers
    assert len(sites) == 2 and all(".1.pypeft_bottleneck." in s for s in sites)
    pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name="p")
    sites = pypeft.state_of(model).adapters["p"].layers
    assert len(sites) == layers and all(s.endswith("feed_forward") for s in sites)
    hidden = model.config.hidden_size
    down = model.get_submodule(sites[0]).adapters["p"].down_weight
    assert tuple(down.shape) == (hidden // 16, hidden)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_train_step_moves_only_the_adapter_and_the_head(family):
    model = T.make(family)
    pypeft.patch(model, method="bottleneck", preset="houlsby")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".pypeft_bottleneck." in n or "classifier" in n or "score" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**T.labels_for(family, T.inputs(family))).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in trainable and p.grad is not None and p.grad.abs().sum() > 0), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "up_weight" in n)


def test_new_sites_take_the_training_flag_and_dropout_runs_only_in_training():
    model = T.make("bert")
    pypeft.patch(model, method="bottleneck", preset="pfeiffer", dropout=0.5)
    randomize(model)
    sites = [m for m in model.modules() if isinstance(m, pypeft.methods.bottleneck.BottleneckSite)]
    assert sites and not any(s.training for s in sites)
    batch = T.inputs("bert")
    assert torch.equal(T.output(model, batch), T.output(model, batch))
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # only the adapter's dropout left
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert not torch.equal(a, b)


def test_several_adapters_set_adapter_delete_and_merge_refused():
    model = T.make("roberta")
    batch = T.inputs("roberta")
    pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name="a")
    pypeft.patch(model, method="bottleneck", preset="houlsby", adapter_name="b")
    randomize(model)
    pypeft.set_adapter(model, "a")
    out_a = T.output(model, batch)
    pypeft.set_adapter(model, "b")
    out_b = T.output(model, batch)
    assert not torch.allclose(out_a, out_b)
    grads = {n for n, p in model.named_parameters() if p.requires_grad and ".pypeft_bottleneck." in n}
    assert grads and all(".adapters.b." in n for n in grads)
    with pytest.raises(ValueError, match="cannot be folded"):
        pypeft.merge(model)
    pypeft.delete_adapter(model, "b")
    assert torch.equal(T.output(model, batch), out_a)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_mixed_batch_rows_equal_each_adapter_alone(family):
    model = T.make(family)
    pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name="a")
    pypeft.patch(model, method="bottleneck", preset="parallel", adapter_name="b")
    randomize(model)
    batch = T.inputs(family, batch=4)
    rows = ["b", "base", "a", "b"]
    with pypeft.mixed_batch(model, rows):
        mixed = T.output(model, batch)
    for name in ("a", "b", "base"):
        if name == "base":
            with pypeft.disabled(model):
                alone = T.output(model, batch)
        else:
            pypeft.set_adapter(model, name)
            alone = T.output(model, batch)
        for i, r in enumerate(rows):
            if r == name:
                torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)


def test_two_threads_on_one_model_equal_serial_runs():
    model = T.make("bert")
    pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name="a")  # reads the residual stream
    pypeft.patch(model, method="bottleneck", preset="parallel", adapter_name="b")
    randomize(model)
    batches = [T.inputs("bert", seed=s) for s in (1, 2)]
    rows = [["a", "b"], ["b", "base"]]
    serial = []
    for batch, r in zip(batches, rows):
        with pypeft.mixed_batch(model, r):
            serial.append(T.output(model, batch))
    results, barrier = [None, None], threading.Barrier(2)

    def run(i):
        barrier.wait()
        for _ in range(5):
            with pypeft.mixed_batch(model, rows[i]):
                out = T.output(model, batches[i])
            results[i] = out if results[i] is None or torch.equal(results[i], out) else "differs"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def test_deepcopy_and_pickle_carry_the_adapters_and_their_hooks():
    model = T.make("gpt2")
    pypeft.patch(model, method="bottleneck", preset="parallel")
    randomize(model)
    batch = T.inputs("gpt2")
    out = T.output(model, batch)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(T.output(twin, batch), out)
        with torch.no_grad():  # the copy's adapters are its own
            for n, p in twin.named_parameters():
                if "up_weight" in n:
                    p.zero_()
        assert torch.equal(T.output(model, batch), out)
        pypeft.unpatch(twin)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in twin.modules())


def test_composes_with_lora_on_the_exit_module_and_unpatch_restores_the_base():
    model = T.make("llama")
    batch = T.inputs("llama")
    base = T.output(model, batch)
    pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name="bn")
    randomize(model)
    only_bottleneck = T.output(model, batch)
    pypeft.patch(model, method="lora", target_modules=["o_proj", "down_proj"], adapter_name="lo", r=2)
    pypeft.set_adapter(model, "bn")  # LoRA replaced the modules the hooks sat on: they moved along
    assert torch.equal(T.output(model, batch), only_bottleneck)
    pypeft.unpatch(model)
    assert torch.equal(T.output(model, batch), base)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_refuses_read_either_way():
    model = pypeft.patch(T.make("bert"), method="bottleneck")
    with pytest.raises(ValueError, match="does not compose"):
        pypeft.patch(model, method="read")
    model = pypeft.patch(T.make("bert"), method="read")
    with pytest.raises(ValueError, match="does not compose"):
        pypeft.patch(model, method="bottleneck")


@pytest.mark.parametrize("family", ["bert", "gpt2", "distilbert"])
def test_save_load_round_trip_in_the_adapters_library_format(family, tmp_path):
    model = T.make(family)
    pypeft.patch(model, method="bottleneck", preset="houlsby", reduction_factor={"0": 8, "default": 16})
    randomize(model)
    batch = T.inputs(family)
    out = T.output(model, batch)
    pypeft.save_adapter(model, tmp_path)
    files = ["adapter.safetensors", "adapter_config.json"]
    if family != "gpt2":  # a classifier's trained head also goes into the library's head files
        files += ["head_config.json", "model_head.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["name"] == "default" and fields["config"]["non_linearity"] == "swish"
    assert fields["config"]["mh_adapter"] and fields["config"]["output_adapter"]
    fresh = T.make(family)
    pypeft.load_adapter(fresh, tmp_path, adapter_name="loaded")
    assert torch.equal(T.output(fresh, batch), out)


def test_load_refuses_library_options_pypeft_does_not_run(tmp_path):
    model = pypeft.patch(T.make("bert"), method="bottleneck")
    pypeft.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    for key, value in (("ln_after", True), ("use_gating", True), ("original_ln_after", False)):
        changed = copy.deepcopy(fields)
        changed["config"][key] = value
        path.write_text(json.dumps(changed))
        with pytest.raises(pypeft.AdapterFormatError, match=f"config.{key}={value!r} is not supported"):
            pypeft.load_adapter(T.make("bert"), tmp_path)
    fields["config"]["init_weights_seed"] = 7  # initialisation only: loads
    fields["config"]["init_weights"] = "houlsby"
    path.write_text(json.dumps(fields))
    pypeft.load_adapter(T.make("bert"), tmp_path)
    del fields["config"]["mh_adapter"]
    path.write_text(json.dumps(fields))
    with pytest.raises(pypeft.AdapterFormatError, match="adapters library's"):
        pypeft.load_adapter(T.make("bert"), tmp_path)


def test_reads_pytorch_adapter_bin_with_weights_only(tmp_path):
    from safetensors.torch import load_file

    model = pypeft.patch(T.make("bert"), method="bottleneck")
    randomize(model)
    pypeft.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter.safetensors")
    (tmp_path / "adapter.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_adapter.bin")
    fresh = pypeft.load_adapter(T.make("bert"), tmp_path)
    batch = T.inputs("bert")
    assert torch.equal(T.output(fresh, batch), T.output(model, batch))
    torch.save({"x": nn.Linear(2, 2)}, tmp_path / "pytorch_adapter.bin")  # not plain tensors: refused
    with pytest.raises(pypeft.AdapterFormatError, match="corrupt"):
        pypeft.load_adapter(T.make("bert"), tmp_path)


@pytest.mark.parametrize("options, pattern", [
    ({"preset": "lora"}, "'preset'"),
    ({"reduction_factor": 0}, "'reduction_factor'"),
    ({"reduction_factor": {"1": 8}}, "no factor for layer 0"),
    ({"non_linearity": "softplus"}, "'non_linearity'"),
    ({"scaling": "learned"}, "'scaling'.*learned"),
    ({"dropout": 1.0}, "'dropout'"),
    ({"leave_out": [5]}, "'leave_out'.*layer 5"),
    ({"leave_out": [0, 1]}, "'leave_out'.*every layer"),
    ({"mh_adapter": False, "output_adapter": False}, "nowhere"),
    ({"preset": "parallel", "original_ln_before": True}, "'original_ln_before'"),
    ({"init_weights": "zeros"}, "'init_weights'"),
])
def test_bad_options_name_the_argument(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        pypeft.patch(T.make("bert"), method="bottleneck", **options)


def test_an_unknown_layout_is_refused_by_name():
    with pytest.raises(ValueError, match="'model'.*stacks"):
        pypeft.patch(T.make("t5"), method="bottleneck")


def _adapter_grads(model, family, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if ".pypeft_bottleneck." in n and p.grad is not None}


@pytest.mark.parametrize("order", ["bottleneck first", "tokentune first"])
def test_composes_with_tokentune_only_selected_tokens_train_the_adapter(order):
    family = "bert"
    batch = T.labels_for(family, T.inputs(family, length=8))
    plain = T.make(family)
    pypeft.patch(plain, method="bottleneck", preset="pfeiffer")
    randomize(plain)
    plain.train()
    for m in plain.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    want_out = plain(**batch).logits.detach()
    want = _adapter_grads(plain, family, batch)

    def tuned(k):
        model = copy.deepcopy(plain)
        pypeft.unpatch(model)
        first, second = ("bottleneck", "tokentune") if order == "bottleneck first" else ("tokentune", "bottleneck")
        options = {"bottleneck": {"preset": "pfeiffer"}, "tokentune": {"k": k, "seed": 0}}
        pypeft.patch(model, method=first, **options[first])
        pypeft.patch(model, method=second, **options[second])
        model.load_state_dict(plain.state_dict(), strict=False)
        return model

    everything = tuned(8)  # k = T: every token selected, so exactly the plain gradients
    torch.testing.assert_close(everything(**batch).logits, want_out)
    got = _adapter_grads(everything, family, batch)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    subset = tuned(2)
    torch.testing.assert_close(subset(**batch).logits, want_out)  # the forward is unchanged
    got = _adapter_grads(subset, family, batch)
    assert got.keys() == want.keys()
    assert all(g.abs().sum() > 0 for g in got.values())
    assert any(not torch.allclose(got[n], want[n], atol=1e-6) for n in want)  # fewer tokens: other gradients


def test_load_refuses_an_adapter_saved_for_another_kind_of_model(tmp_path):
    model = pypeft.patch(T.make("bert"), method="bottleneck")
    pypeft.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    fields["model_type"] = "roberta"
    path.write_text(json.dumps(fields))
    with pytest.raises(pypeft.AdapterFormatError, match="saved for a 'roberta' model, but this model is 'bert'"):
        pypeft.load_adapter(T.make("bert"), tmp_path)
