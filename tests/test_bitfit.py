"""pypeft.patch(method="bitfit") on tiny BERT, RoBERTa, GPT-2 (Conv1D) and
Llama (bias-less: add_missing_biases).

The reference is the model itself, unpatched, in torch.nn: a plain copy of
the base with the trained biases assigned to its modules' `bias` parameters
(and the trained head loaded into its head). A patched model must compute
what that copy computes, train exactly those biases, and give the base back
exactly (disabled, unmerge, unpatch).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import pypeft
import tiny_models as T
from pypeft.io import CONFIG_NAME, WEIGHTS_NAME

FAMILIES = {"bert": {}, "roberta": {}, "gpt2": {}, "llama": {"add_missing_biases": True}}


def trained_biases(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Module name -> the adapter's trained bias, read off the parameter names
    (a BitFit bias inside a LoRA layer sits under its base_layer)."""
    suffix = f".bitfit_bias.{adapter}"
    return {n[: -len(suffix)].replace(".base_layer", ""): p for n, p in model.named_parameters()
            if n.endswith(suffix)}


def with_biases(base: nn.Module, model: nn.Module, adapter: str = "default") -> nn.Module:
    """A plain copy of `base` with the adapter's biases and heads assigned."""
    reference = copy.deepcopy(base)
    for name, bias in trained_biases(model, adapter).items():
        reference.get_submodule(name).bias = nn.Parameter(bias.detach().clone())
    for name in model.pypeft.adapters[adapter].modules_to_save:
        reference.get_submodule(name).load_state_dict(model.get_submodule(name).copies[adapter].state_dict())
    return reference


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def patched(family: str, seed: int = 0, **options):
    base = T.make(family)
    model = pypeft.patch(copy.deepcopy(base), method="bitfit", **{**FAMILIES[family], **options})
    randomize(model, seed)
    return base, model


def assert_same_state(model: nn.Module, base: nn.Module) -> None:
    got, want = model.state_dict(), base.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# --- what it computes and trains -----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_equals_a_plain_copy_with_the_biases_assigned(family):
    base, model = patched(family)
    batch = T.inputs(family)
    names = set(trained_biases(model))
    expected = {n for n, m in base.named_modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    if family == "llama":  # no biases of its own: every linear layer but the output head gets one
        expected = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    heads = set(model.pypeft.adapters["default"].modules_to_save)
    assert names == {n for n in expected if not any(n == h or n.startswith(h + ".") for h in heads)} and names
    torch.testing.assert_close(T.output(model, batch), T.output(with_biases(base, model), batch), rtol=0, atol=0)


def test_starts_equal_to_the_base_and_added_biases_start_at_zero():
    for family in FAMILIES:
        base = T.make(family)
        model = pypeft.patch(copy.deepcopy(base), method="bitfit", **FAMILIES[family])
        batch = T.inputs(family)
        assert torch.equal(T.output(model, batch), T.output(base, batch))
        for name, bias in trained_biases(model).items():
            original = base.get_submodule(name).bias
            assert torch.equal(bias, original if original is not None else torch.zeros_like(bias)), name


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_only_the_biases_and_the_head_get_gradients_and_move(family):
    base, model = patched(family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".bitfit_bias.default" in n or ".copies.default." in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**T.labels_for(family, T.inputs(family))).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable and {n for n in moved if "bitfit_bias" in n}
    # what moved, written into a plain copy, is what the patched model computes
    model.eval()
    batch = T.inputs(family)
    torch.testing.assert_close(T.output(model, batch), T.output(with_biases(base, model), batch), rtol=0, atol=0)


def test_paper_selection_query_and_intermediate_trains_exactly_those_biases():
    base = T.make("bert")
    model = pypeft.patch(copy.deepcopy(base), method="bitfit", target_modules=["query", "intermediate.dense"],
                         modules_to_save=[])
    want = {n for n in dict(base.named_modules()) if n.endswith(("attention.self.query", "intermediate.dense"))}
    assert set(trained_biases(model)) == want and len(want) == 2 * base.config.num_hidden_layers
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**T.labels_for("bert", T.inputs("bert"))).loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n.replace(".bitfit_bias.default", "") for n in moved} == want


# --- the base back, exactly -------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_and_unpatch_give_the_base_exactly(family):
    base, model = patched(family)
    batch = T.inputs(family)
    want = T.output(base, batch)
    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), want)
    pypeft.merge(model)
    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), want)
    pypeft.unpatch(model)
    assert not any(isinstance(m, pypeft.PypeftLayer) for m in model.modules())
    assert_same_state(model, base)
    assert torch.equal(T.output(model, batch), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_merge_folds_and_unmerge_restores_exactly(family, dtype):
    base = T.make(family).to(dtype)
    model = pypeft.patch(copy.deepcopy(base), method="bitfit", **FAMILIES[family])
    randomize(model)
    batch = T.inputs(family)
    trained = T.output(model, batch)
    for _ in range(3):
        pypeft.merge(model)
        # merged: the plain modules run with the trained bias copied in, so the same numbers
        assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".base_layer.bias"))
        torch.testing.assert_close(T.output(model, batch), trained, rtol=0, atol=0)
        pypeft.unmerge(model)
        torch.testing.assert_close(T.output(model, batch), trained, rtol=0, atol=0)
    pypeft.unpatch(model)
    assert_same_state(model, base)  # added biases are gone again, the others bit-for-bit


def test_a_copy_of_a_patched_model_computes_the_same_and_unpatches_alone():
    base, model = patched("gpt2")
    batch = T.inputs("gpt2")
    twin = copy.deepcopy(model)
    assert torch.equal(T.output(twin, batch), T.output(model, batch))
    pypeft.unpatch(twin)
    assert_same_state(twin, base)
    assert not torch.equal(T.output(model, batch), T.output(twin, batch))


# --- several adapters ----------------------------------------------------------------------

def test_set_adapter_and_delete_adapter():
    base = T.make("bert")
    model = copy.deepcopy(base)
    outputs = {}
    batch = T.inputs("bert")
    for i, name in enumerate(["a", "b"]):
        pypeft.patch(model, method="bitfit", adapter_name=name, target_modules=None if name == "a" else ["dense"])
        randomize(model, seed=i)
        outputs[name] = T.output(model, batch)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == \
            {n for n, _ in model.named_parameters() if n.endswith(f".{name}") or f".copies.{name}." in n}
    pypeft.set_adapter(model, "a")
    assert torch.equal(T.output(model, batch), outputs["a"])
    torch.testing.assert_close(outputs["a"], T.output(with_biases(base, model, "a"), batch), rtol=0, atol=0)
    torch.testing.assert_close(outputs["b"], T.output(with_biases(base, model, "b"), batch), rtol=0, atol=0)
    pypeft.delete_adapter(model, "a")
    assert model.pypeft.active == "b" and not trained_biases(model, "a")
    assert torch.equal(T.output(model, batch), outputs["b"])
    pypeft.unpatch(model)
    assert_same_state(model, base)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_mixed_batch_equals_each_row_alone(family):
    model = copy.deepcopy(T.make(family))
    for i, name in enumerate(["a", "b"]):
        pypeft.patch(model, method="bitfit", adapter_name=name, **FAMILIES[family])
        randomize(model, seed=i)
    batch = T.inputs(family, batch=3)
    rows = ["b", "base", "a"]
    alone = {}
    for name in ("a", "b"):
        pypeft.set_adapter(model, name)
        alone[name] = T.output(model, batch)
    with pypeft.disabled(model):
        alone["base"] = T.output(model, batch)
    with pypeft.mixed_batch(model, rows):
        mixed = T.output(model, batch)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-6)


# --- with the other methods -------------------------------------------------------------------

@pytest.mark.parametrize("order", ["lora first", "bitfit first"])
def test_composes_with_lora_inside_its_layers(order):
    """A module LoRA adapts gets its trained bias inside the LoRA layer: each
    adapter computes what it computes alone, in single and mixed batches."""
    base = T.make("bert")
    model = copy.deepcopy(base)
    steps = [("lora", {"r": 4}), ("bitfit", {})]
    for method, options in steps if order == "lora first" else steps[::-1]:
        pypeft.patch(model, method=method, adapter_name=method, **options)
        randomize(model, seed=len(model.pypeft.adapters))
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query).__name__ == "LoraLinear" and type(query.base_layer).__name__ == "BitFitLayer"
    batch = T.inputs("bert", batch=3)
    pypeft.set_adapter(model, "bitfit")
    bitfit = T.output(model, batch)
    torch.testing.assert_close(bitfit, T.output(with_biases(base, model, "bitfit"), batch), rtol=0, atol=0)
    # LoRA alone: its weights loaded into a copy of the base with LoRA only
    lora_only = pypeft.patch(copy.deepcopy(base), method="lora", r=4)
    lora_params = {re.sub(r"\.lora$", ".default", n).replace(".copies.lora.", ".copies.default."): p
                   for n, p in model.named_parameters() if n.endswith(".lora") or ".copies.lora." in n}
    with torch.no_grad():
        for n, p in lora_only.named_parameters():
            if p.requires_grad:
                p.copy_(lora_params[n])
    pypeft.set_adapter(model, "lora")
    lora = T.output(model, batch)
    torch.testing.assert_close(lora, T.output(lora_only, batch), rtol=1e-6, atol=1e-6)
    rows = ["lora", "bitfit", "base"]
    with pypeft.mixed_batch(model, rows):
        mixed = T.output(model, batch)
    want = {"lora": lora, "bitfit": bitfit, "base": T.output(base, batch)}
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], want[name][i], rtol=1e-5, atol=1e-6)
    pypeft.set_adapter(model, "bitfit")
    pypeft.merge(model)
    torch.testing.assert_close(T.output(model, batch), bitfit, rtol=0, atol=0)
    pypeft.unpatch(model)
    assert_same_state(model, base)


def test_composes_with_vera():
    base = T.make("gpt2")  # Conv1D layers under VeRA's
    model = pypeft.patch(copy.deepcopy(base), method="vera", r=8, adapter_name="vera")
    randomize(model, seed=1)
    batch = T.inputs("gpt2", batch=2)
    vera = T.output(model, batch)
    pypeft.patch(model, method="bitfit", adapter_name="bitfit")
    randomize(model, seed=2)
    assert type(model.transformer.h[0].attn.c_attn.base_layer).__name__ == "BitFitLayer"
    bitfit = T.output(model, batch)
    torch.testing.assert_close(bitfit, T.output(with_biases(base, model, "bitfit"), batch), rtol=0, atol=0)
    pypeft.set_adapter(model, "vera")
    torch.testing.assert_close(T.output(model, batch), vera, rtol=0, atol=0)
    with pypeft.mixed_batch(model, ["bitfit", "vera"]):
        mixed = T.output(model, batch)
    torch.testing.assert_close(mixed[0], bitfit[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], vera[1], rtol=1e-5, atol=1e-6)
    pypeft.unpatch(model)
    assert_same_state(model, base)


@pytest.mark.parametrize("order", ["tokentune first", "bitfit first"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_composes_with_tokentune(family, order):
    """The biases' gradients are TokenTune's: those of a plain copy in which
    every unselected token's per-token outputs are constants
    (test_tokentune_patch's reference)."""
    from test_tokentune_patch import batch_for, fixed, make, positions_for, reference_gradients

    model = make(family)
    reference = copy.deepcopy(model)
    for name, p in reference.named_parameters():
        p.requires_grad_(name.endswith(".bias"))
    positions = positions_for(3)
    steps = [lambda: pypeft.patch(model, method="tokentune", k=3, selector=fixed(positions)),
             lambda: pypeft.patch(model, method="bitfit", modules_to_save=[])]
    for step in steps if order == "tokentune first" else steps[::-1]:
        step()
    batch = batch_for(family)
    biases = trained_biases(model)
    grads = torch.autograd.grad(model(**batch).loss, list(biases.values()))
    want = reference_gradients(reference, batch, positions)
    assert {f"{n}.bias" for n in biases} == set(want)
    for (name, _), got in zip(biases.items(), grads):
        torch.testing.assert_close(got, want[f"{name}.bias"], rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    pypeft.unpatch(model)
    assert not any(isinstance(m, pypeft.PypeftLayer) for m in model.modules())


def test_does_not_compose_with_read():
    model = pypeft.patch(T.make("bert"), method="read", hidden=8)
    with pytest.raises(ValueError, match="patched with read already.*bitfit does not compose with read"):
        pypeft.patch(model, method="bitfit", adapter_name="b")
    model = pypeft.patch(T.make("bert"), method="bitfit")
    with pytest.raises(ValueError, match="read does not compose with bitfit"):
        pypeft.patch(model, method="read", hidden=8, adapter_name="r")


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiles_with_fullgraph_for_linear_and_layer_norm(backend):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4, bias=False))
    model = pypeft.patch(copy.deepcopy(base), method="bitfit", add_missing_biases=True)
    randomize(model)
    x = torch.randn(3, 5, 8)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(trained_biases(model).values()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), list(trained_biases(model).values()))
    torch.testing.assert_close(got, eager)
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(eager, with_biases(base, model)(x), rtol=0, atol=0)


# --- on disk ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_save_and_load_round_trip(tmp_path, family):
    base, model = patched(family)
    batch = T.inputs(family)
    pypeft.save_adapter(model, tmp_path)
    fields = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert fields["pypeft_method"] == "bitfit" and fields["target_modules"] == sorted(trained_biases(model))
    assert fields["added_biases"] == (fields["target_modules"] if family == "llama" else [])
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert {k for k in tensors if k.startswith("bitfit.")} == {f"bitfit.{n}.bias" for n in trained_biases(model)}
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        assert json.loads(f.metadata()["pypeft.adapter_config"]) == fields
    loaded = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(T.output(loaded, batch), T.output(model, batch))
    # beside another adapter: added, not made active
    pypeft.load_adapter(model, tmp_path, adapter_name="again")
    assert model.pypeft.active == "default"
    pypeft.set_adapter(model, "again")
    assert torch.equal(T.output(model, batch), T.output(loaded, batch))


def _break(directory, key=None, shape=None, dtype=None, drop=None, config=None):
    tensors = load_file(directory / WEIGHTS_NAME)
    with safe_open(directory / WEIGHTS_NAME, framework="pt") as f:
        metadata = f.metadata()
    if key is not None:
        tensors[key] = torch.zeros(shape, dtype=dtype or torch.float32)
    if drop is not None:
        del tensors[drop]
    save_file(tensors, directory / WEIGHTS_NAME, metadata=metadata)
    if config is not None:
        fields = json.loads((directory / CONFIG_NAME).read_text())
        fields.update(config)
        (directory / CONFIG_NAME).write_text(json.dumps(fields))


@pytest.mark.parametrize("damage, pattern", [
    (lambda k, s: dict(key=k, shape=(s + 1,)), "expected shape"),
    (lambda k, s: dict(key=k, shape=(s,), dtype=torch.int32), "floating dtype"),
    (lambda k, s: dict(drop=k), "has no tensor"),
    (lambda k, s: dict(key="bitfit.bert.nowhere.bias", shape=(s,)), "belongs to no module"),
    (lambda k, s: dict(config={"add_missing_biases": True}), "do not belong together"),
])
def test_load_checks_the_files(tmp_path, damage, pattern):
    base, model = patched("bert")
    pypeft.save_adapter(model, tmp_path)
    key = "bitfit.bert.encoder.layer.0.attention.self.query.bias"
    _break(tmp_path, **damage(key, 64))
    target = copy.deepcopy(base)
    with pytest.raises(pypeft.AdapterFormatError, match=pattern):
        pypeft.load_adapter(target, tmp_path)
    assert pypeft.state_of(target) is None  # nothing changed


def test_load_refuses_biases_added_where_the_model_has_its_own(tmp_path):
    _, model = patched("llama", target_modules=["q_proj"])
    pypeft.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    cfg = T.make("llama").config
    cfg.attention_bias = True
    with_bias = type(T.make("llama"))(cfg)
    with pytest.raises(pypeft.AdapterFormatError, match="q_proj.*had no bias where the adapter was trained"):
        pypeft.load_adapter(with_bias, tmp_path)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("family, options, pattern", [
    ("bert", dict(add_missing_biases="yes"), "argument 'add_missing_biases': expected True or False"),
    ("bert", dict(target_modules=[]), "argument 'target_modules': expected a non-empty list"),
    ("bert", dict(target_modules=3), "argument 'target_modules': expected None, a list"),
    ("bert", dict(exclude_modules=["query", ""]), "argument 'exclude_modules'"),
    ("bert", dict(target_modules="(query"), "argument 'target_modules'.*not a valid regular expression"),
    ("bert", dict(target_modules=["nothing_here"]), "argument 'target_modules'.*selected no module with a bias"),
    ("bert", dict(target_modules=["query"], exclude_modules=["query"]), "after exclude_modules"),
    ("bert", dict(adapter_name="base"), "argument 'adapter_name'"),
    ("bert", dict(modules_to_save=["nowhere"]), "argument 'modules_to_save'"),
    ("bert", dict(rank=4), "unknown option 'rank'"),
    ("llama", dict(), "selected no module with a bias.*add_missing_biases=True adds it"),
    ("llama", dict(target_modules=["q_proj"]), "'q_proj' selects only modules without a bias.*add_missing_biases=True"),
    ("llama", dict(target_modules=".*q_proj"), "selects only modules without a bias"),
    ("llama", dict(target_modules=["input_layernorm"], add_missing_biases=True),
     "'input_layernorm' selects only modules that have no bias.*LlamaRMSNorm"),
])
def test_bad_options_are_refused_by_name(family, options, pattern):
    model = T.make(family)
    with pytest.raises(ValueError, match=pattern):
        pypeft.patch(model, method="bitfit", **options)
    assert pypeft.state_of(model) is None


def test_config_object_and_export():
    model = T.make("bert")
    pypeft.patch(model, pypeft.BitFitConfig(target_modules=("query",), modules_to_save=[]))
    assert set(trained_biases(model)) == {n for n, _ in model.named_modules() if n.endswith("self.query")}
