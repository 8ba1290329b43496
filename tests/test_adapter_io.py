"""Adapters on disk in PEFT's format: both directions against the real `peft`
package, named adapters, and bad directories (clear errors, nothing lost)."""

import copy
import json
import os

import pytest
import safetensors.torch
import torch

import pypeft
import tiny_models as T

peft = pytest.importorskip("peft", reason="the `peft` package is the oracle for the adapter format")

TASK = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def randomize(model, seed=0):
    """Non-trivial adapter (and head copy) values, the same way for peft and pypeft models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_model(base, family, **lora):
    cfg = peft.LoraConfig(task_type=TASK[family], **lora)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


@pytest.mark.parametrize("family", list(T.FAMILIES))
@pytest.mark.parametrize("variant", ["default", "all-linear+rslora"])
def test_peft_adapter_loads_into_pypeft(tmp_path, family, variant):
    base = T.make(family)
    lora = dict(r=4, lora_alpha=8)
    if variant != "default":
        lora.update(target_modules="all-linear", use_rslora=True, r=8)
    theirs = peft_model(base, family, **lora)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    batch = T.inputs(family)
    want = T.output(theirs.eval(), batch)
    ours = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    got = T.output(ours, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - T.output(base, batch)).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("family", list(T.FAMILIES))
@pytest.mark.parametrize("variant", ["default", "all-linear+rslora"])
def test_pypeft_adapter_loads_into_peft(tmp_path, family, variant):
    base = T.make(family)
    options = dict(r=4, alpha=8) if variant == "default" else dict(r=8, alpha=8, rslora=True,
                                                                  target_modules="all-linear")
    ours = pypeft.patch(copy.deepcopy(base), method="lora", **options)
    randomize(ours)
    pypeft.save_adapter(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    batch = T.inputs(family)
    want = T.output(ours, batch)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(T.output(theirs, batch), want, atol=1e-5, rtol=1e-5)
    # and back: pypeft reads its own files
    again = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(T.output(again, batch), want, atol=1e-6, rtol=1e-6)


def test_saved_keys_are_peft_keys(tmp_path):
    base = T.make("gpt2")
    ours = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
    pypeft.save_adapter(ours, tmp_path / "ours")
    theirs = peft_model(base, "gpt2", r=4, lora_alpha=8)
    theirs.save_pretrained(tmp_path / "theirs")
    load = safetensors.torch.load_file
    a = load(tmp_path / "ours" / "adapter_model.safetensors")
    b = load(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True and cfg["r"] == 4


def test_named_adapter_joins_a_patched_model(tmp_path):
    base = T.make("bert")
    batch = T.inputs("bert")
    first = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
    randomize(first, seed=1)
    pypeft.save_adapter(first, tmp_path / "first")
    model = pypeft.patch(copy.deepcopy(base), method="lora", r=2, alpha=4, adapter_name="other")
    randomize(model, seed=2)
    out_other = T.output(model, batch)
    pypeft.load_adapter(model, tmp_path / "first", adapter_name="first")
    assert model.pypeft.active == "other" and torch.equal(T.output(model, batch), out_other)
    pypeft.set_adapter(model, "first")
    torch.testing.assert_close(T.output(model, batch), T.output(first, batch), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="'adapter_name'.*'first' exists already"):
        pypeft.load_adapter(model, tmp_path / "first", adapter_name="first")


# --- bad directories ---------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = pypeft.patch(T.make("bert"), method="lora", r=4, alpha=8)
    randomize(model)
    pypeft.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _assert_untouched(model, before):
    assert "pypeft" not in model.__dict__
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


def test_adapter_for_other_shapes_names_the_key(saved):
    cfg = T.bert().config
    cfg.hidden_size, cfg.intermediate_size = 32, 48
    import transformers
    torch.manual_seed(0)
    other = transformers.BertForSequenceClassification(cfg)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"'base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query"
                                         r"\.lora_A\.weight'.*expected shape \[4, 32\], got \[4, 64\]"):
        pypeft.load_adapter(other, saved)
    _assert_untouched(other, before)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing weights", "bad json", "unknown method",
                                    "dora", "missing dir"])
def test_damaged_directory_raises_and_loses_nothing(saved, damage, tmp_path):
    weights, config = saved / "adapter_model.safetensors", saved / "adapter_config.json"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "bad json":
        config.write_text("{not json")
    elif damage in ("unknown method", "dora"):
        cfg = json.loads(config.read_text())
        cfg.update({"peft_type": "IA3"} if damage == "unknown method" else {"use_dora": True})
        config.write_text(json.dumps(cfg))
    target = saved if damage != "missing dir" else tmp_path / "nowhere"
    model = T.make("bert")
    before = copy.deepcopy(model.state_dict())
    pattern = {"truncated": "corrupt or truncated", "garbage": "corrupt or truncated",
               "missing weights": "no adapter_model.safetensors", "bad json": "not valid JSON",
               "unknown method": r"peft's \(peft_type 'LORA'\).*got peft_type='IA3'", "dora": "use_dora=True is not supported",
               "missing dir": "no adapter_config.json"}[damage]
    with pytest.raises(ValueError, match=pattern):
        pypeft.load_adapter(model, target)
    _assert_untouched(model, before)


def test_save_is_atomic(saved, monkeypatch):
    """A crash while the new weights are written leaves the previous adapter intact."""
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = pypeft.patch(T.make("bert"), method="lora", r=4, alpha=8)
    randomize(model, seed=5)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pypeft.io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pypeft.save_adapter(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == files  # same files, same bytes, no leftovers
    monkeypatch.undo()
    pypeft.save_adapter(model, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() != files["adapter_model.safetensors"]


def test_save_needs_a_patched_model(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        pypeft.save_adapter(T.make("bert"), tmp_path)


# --- peft's semantics on more families (DistilBERT's two heads, OPT, Qwen2) ----------------

CROSS = {"distilbert": "SEQ_CLS", "opt": "CAUSAL_LM", "qwen2": "CAUSAL_LM"}
CROSS_TARGETS = {"distilbert": ["q_lin", "v_lin"]}  # peft has no default for DistilBERT


@pytest.mark.parametrize("family", list(CROSS))
def test_peft_lora_crosses_both_ways_on_more_families(tmp_path, family):
    """peft selects modules_to_save by plain suffix: for DistilBERT, "classifier"
    also takes pre_classifier. Both must cross, in both directions."""
    base = T.make(family)
    batch = T.inputs(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        task_type=CROSS[family], r=4, lora_alpha=8, target_modules=CROSS_TARGETS.get(family)))
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    want = T.output(theirs.eval(), batch)
    ours = pypeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(T.output(ours, batch), want, atol=1e-5, rtol=1e-5)
    assert (want - T.output(base, batch)).abs().max() > 1e-3
    # and back: pypeft's save loads into peft with the same outputs
    pypeft.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(T.output(again, batch), want, atol=1e-5, rtol=1e-5)


def test_distilbert_patch_trains_what_peft_trains(tmp_path):
    """The same default modules_to_save as peft: both heads of DistilBERT."""
    base = T.make("distilbert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                       target_modules=["q_lin", "v_lin"]))
    ours = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
    def trained(model, marker):
        return sorted({n.split(marker)[0].replace("base_model.model.", "") for n, p in model.named_parameters()
                       if p.requires_grad and marker in n})
    assert trained(ours, ".copies.") == trained(theirs, ".modules_to_save.") == ["classifier", "pre_classifier"]
    randomize(ours)
    pypeft.save_adapter(ours, tmp_path)
    batch = T.inputs("distilbert")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(T.output(loaded, batch), T.output(ours, batch), atol=1e-5, rtol=1e-5)


# --- what a peft config may say ---------------------------------------------------------

def _save_peft_lora(tmp_path, **fields):
    base = T.make("bert")
    theirs = peft_model(base, "bert", r=4, lora_alpha=8)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(fields)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return base, T.output(theirs.eval(), T.inputs("bert"))


@pytest.mark.parametrize("fields", [
    {"init_lora_weights": False}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": "eva"},
    {"eva_config": {"rho": 2.0}}, {"loftq_config": {}}, {"inference_mode": False},
    {"runtime_config": {"ephemeral_gpu_offload": True}}, {"base_model_name_or_path": "elsewhere"},
    {"some_future_option": None},
])
def test_peft_fields_that_only_affect_initialisation_load(tmp_path, fields):
    base, want = _save_peft_lora(tmp_path, **fields)
    got = T.output(pypeft.load_adapter(copy.deepcopy(base), tmp_path), T.inputs("bert"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields, named", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"use_dora": True}, "use_dora=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"rank_pattern": {"query": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"query": 8}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"target_parameters": ["query.weight"]}, "target_parameters"),
    ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
    ({"some_future_option": 3}, "some_future_option=3.*unknown"),
])
def test_peft_fields_that_change_the_math_are_refused_by_name(tmp_path, fields, named):
    base, _ = _save_peft_lora(tmp_path, **fields)
    model = copy.deepcopy(base)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(pypeft.AdapterFormatError, match=named):
        pypeft.load_adapter(model, tmp_path)
    _assert_untouched(model, before)


def test_peft_exclude_modules_is_honoured(tmp_path):
    base = T.make("bert")
    theirs = peft_model(base, "bert", r=4, lora_alpha=8, target_modules=["query", "value"],
                        exclude_modules=["bert.encoder.layer.0.attention.self.value"])
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    batch = T.inputs("bert")
    torch.testing.assert_close(T.output(ours, batch), T.output(theirs.eval(), batch), atol=1e-5, rtol=1e-5)
    assert "bert.encoder.layer.0.attention.self.value" not in ours.pypeft.adapters["default"].layers


def test_config_without_r_takes_peft_s_default(tmp_path):
    """peft reads a missing field as its default (r=8); so does pypeft, and
    the tensors' shapes then say clearly what does not fit."""
    base, _ = _save_peft_lora(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["r"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(pypeft.AdapterFormatError, match=r"lora_A\.weight'.*expected shape \[8, 64\], got \[4, 64\]"):
        pypeft.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_or_bool_tensor_is_refused(saved, dtype):
    path = saved / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].to(dtype)
    safetensors.torch.save_file(tensors, path)
    model = T.make("bert")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(pypeft.AdapterFormatError, match=rf"{key}'.*expected a floating dtype, got {dtype}"):
        pypeft.load_adapter(model, saved)
    _assert_untouched(model, before)


def test_save_onto_a_file_names_the_argument(tmp_path):
    model = pypeft.patch(T.make("bert"), method="lora", r=4)
    target = tmp_path / "adapter"
    target.write_text("not a directory")
    with pytest.raises(ValueError, match="argument 'directory'.*is a file"):
        pypeft.save_adapter(model, target)
    assert target.read_text() == "not a directory"


def test_interrupted_save_is_refused_on_load(saved, monkeypatch):
    """A crash between renaming the weights and renaming the config leaves new
    weights beside the old config: load_adapter refuses the pair by name."""
    model = pypeft.patch(T.make("bert"), method="lora", r=8, alpha=8)  # another r: other options
    replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power lost")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power lost"):
        pypeft.save_adapter(model, saved)
    monkeypatch.undo()
    assert [p.name for p in calls] == ["adapter_model.safetensors", "adapter_config.json"]
    with pytest.raises(pypeft.AdapterFormatError, match=r"saved with r=8 but adapter_config.json says r=4"):
        pypeft.load_adapter(T.make("bert"), saved)


def test_hand_edited_bookkeeping_fields_still_load(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/models/elsewhere"
    config["inference_mode"] = False
    (saved / "adapter_config.json").write_text(json.dumps(config))
    pypeft.load_adapter(T.make("bert"), saved)


@pytest.mark.parametrize("method", ["lora", "vera", "read"])
def test_load_into_an_eval_model_keeps_eval(tmp_path, method):
    """from_pretrained returns a model in eval(); the loaded adapter must not
    run dropout: two forwards agree, and every new module is in eval mode."""
    options = {"lora": dict(r=4, dropout=0.5), "vera": dict(r=8, dropout=0.5), "read": dict(hidden=8)}[method]
    trained = pypeft.patch(T.make("bert"), method=method, **options)
    randomize(trained)
    pypeft.save_adapter(trained, tmp_path)
    model = T.make("bert").eval()
    pypeft.load_adapter(model, tmp_path)
    assert not any(m.training for m in model.modules())
    batch = T.inputs("bert")
    assert torch.equal(T.output(model, batch), T.output(model, batch))


def test_peft_vera_saved_with_init_weights_false_loads(tmp_path):
    base = T.make("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(task_type="SEQ_CLS", r=8, init_weights=False,
                                                                       target_modules=["query", "value"]))
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    batch = T.inputs("bert")
    ours = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(T.output(ours, batch), T.output(theirs.eval(), batch), atol=1e-5, rtol=1e-5)
