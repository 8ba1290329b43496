"""The `adapters` library (AdapterHub) as an oracle, checked on its own before any
pypeft method leans on it: models saved by this venv's transformers 5 load in
the oracle's transformers 4.57 with the same outputs; the library's adapters
survive its own save/load; and a plain-PyTorch reading of its math
(tests/reference_bottleneck.py) reproduces its outputs. Every case of this
module runs in one oracle subprocess (the `oracle` fixture)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import reference_bottleneck as RB
import tiny_models as T
from adapters_oracle import read_output, run_oracle, write_inputs

CROSS_FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama"]
# The class each tiny family is saved as, by its transformers Auto name.
HEAD_CLASS = {"bert": "AutoModelForSequenceClassification", "roberta": "AutoModelForSequenceClassification",
              "distilbert": "AutoModelForSequenceClassification", "gpt2": "AutoModelForCausalLM",
              "llama": "AutoModelForCausalLM"}
# Round trips: one preset per family, saved as .bin and as safetensors.
ROUND_TRIP = [("bert", "seq_bn", False), ("roberta", "double_seq_bn", True), ("distilbert", "par_bn", False),
              ("gpt2", "double_seq_bn", True), ("llama", "seq_bn", True)]
# Eager reference cases: id -> (preset, overrides, save as safetensors). The
# variants reach the branches the presets leave alone (adapter norms, gating,
# learned per-channel scaling, per-layer widths, leave_out, "post_add").
EAGER = {
    "seq_bn": ("seq_bn", {}, True),
    "double_seq_bn": ("double_seq_bn", {}, True),
    "par_bn": ("par_bn", {}, True),
    # ln_before cannot be saved as safetensors by the library (shared tensors).
    "houlsby-norms-gate": ("double_seq_bn", {"ln_before": True, "ln_after": True, "use_gating": True,
                                             "scaling": "channel", "reduction_factor": {"0": 8, "default": 16},
                                             "leave_out": [1]}, False),
    "pfeiffer-post-add": ("seq_bn", {"residual_before_ln": "post_add", "ln_after": True,
                                     "adapter_residual_before_ln": True, "non_linearity": "gelu",
                                     "scaling": 0.5}, True),
    "par-learned": ("par_bn", {"scaling": "learned", "ln_after": True, "reduction_factor": 4}, True),
}
RANDOM = {"std": 0.2}
PRESETS = ["seq_bn", "double_seq_bn", "par_bn"]


def _adapter(name, preset, seed, **overrides):
    return {"name": name, "config": preset, "overrides": overrides, "random": {**RANDOM, "seed": seed}}


MINIMAL_CONFIG = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu"}


def _write_adapter(directory, name, rename=None):
    """A BertModel adapter at both layers' output place, random values, a config
    of only BnConfig's required fields; rename=(old, new) misnames keys."""
    directory.mkdir()
    g = torch.Generator().manual_seed(12)
    state = {}
    for i in range(2):
        place = f"encoder.layer.{i}.output.adapters.{name}."
        for key, shape in (("adapter_down.0.weight", (4, 64)), ("adapter_down.0.bias", (4,)),
                           ("adapter_up.weight", (64, 4)), ("adapter_up.bias", (64,))):
            key = key.replace(*rename) if rename else key
            state[place + key] = torch.randn(shape, generator=g) * 0.2
    save_file(state, str(directory / "adapter.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"name": name, "config": MINIMAL_CONFIG}))


def _cases(tmp):
    """Every case of this module, and what the main venv computed for them."""
    cases, expected = [], {}
    for fam in CROSS_FAMILIES:
        model = T.make(fam)
        model.save_pretrained(tmp / fam)
        batch = T.inputs(fam)
        write_inputs(tmp / f"{fam}-in.safetensors", batch)
        with torch.no_grad():
            expected[f"{fam}-head"] = model(**batch).logits
            expected[f"{fam}-base"] = model.base_model(**batch).last_hidden_state
        common = {"model_dir": str(tmp / fam), "inputs": str(tmp / f"{fam}-in.safetensors")}
        # The saved class (head included) and the bare base model; each plain, and
        # made adapter-capable with no adapter added (which must change nothing).
        for kind, cls in (("head", HEAD_CLASS[fam]), ("base", "AutoModel")):
            for init in (False, True):
                cid = f"{fam}-{kind}-init{int(init)}"
                cases.append({"id": cid, **common, "model_class": cls, "init": init,
                              "output": str(tmp / f"{cid}.safetensors")})

    for fam, preset, safe in ROUND_TRIP:
        common = {"model_dir": str(tmp / fam), "inputs": str(tmp / f"{fam}-in.safetensors"),
                  "model_class": HEAD_CLASS[fam]}
        cid = f"rt-{fam}-{preset}"
        cases.append({"id": cid + "-save", **common, "add_adapters": [_adapter("a", preset, 1)], "active": "a",
                      "output": str(tmp / f"{cid}-save.safetensors"),
                      "save_adapters": [{"name": "a", "dir": str(tmp / cid), "use_safetensors": safe}]})
        cases.append({"id": cid + "-load", **common, "load_adapters": [{"dir": str(tmp / cid)}], "active": "a",
                      "output": str(tmp / f"{cid}-load.safetensors")})

    # Fusion round trip: two adapters and a dynamic fusion over them, saved in
    # three directories, loaded into a fresh model.
    common = {"model_dir": str(tmp / "bert"), "inputs": str(tmp / "bert-in.safetensors"), "model_class": "AutoModel"}
    dirs = {n: str(tmp / f"rt-fusion-{n}") for n in ("a", "b", "a,b")}
    cases.append({"id": "rt-fusion-save", **common,
                  "add_adapters": [_adapter("a", "seq_bn", 1), _adapter("b", "seq_bn", 2, reduction_factor=8)],
                  "add_fusions": [{"adapters": ["a", "b"], "config": "dynamic", "random": {**RANDOM, "seed": 3}}],
                  "active": {"fuse": ["a", "b"]}, "output": str(tmp / "rt-fusion-save.safetensors"),
                  "save_adapters": [{"name": n, "dir": dirs[n]} for n in ("a", "b")],
                  "save_fusions": [{"adapters": ["a", "b"], "dir": dirs["a,b"], "use_safetensors": True}]})
    cases.append({"id": "rt-fusion-load", **common,
                  "load_adapters": [{"dir": dirs["a"]}, {"dir": dirs["b"]}], "load_fusions": [{"dir": dirs["a,b"]}],
                  "active": {"fuse": ["a", "b"]}, "output": str(tmp / "rt-fusion-load.safetensors")})

    # Eager reference: BERT base model, random adapter weights.
    for name, (preset, overrides, safe) in EAGER.items():
        cid = f"eager-{name}"
        cases.append({"id": cid, **common, "add_adapters": [_adapter("a", preset, 4, **overrides)], "active": "a",
                      "output": str(tmp / f"{cid}.safetensors"),
                      "save_adapters": [{"name": "a", "dir": str(tmp / cid), "use_safetensors": safe}]})
    # A static fusion (no value matrix) over a Houlsby and a Pfeiffer-placed
    # adapter that share placement (mh and output): the last one's config rules.
    cases.append({"id": "eager-fusion-static", **common,
                  "add_adapters": [_adapter("h", "double_seq_bn", 5),
                                   _adapter("p", "seq_bn", 6, mh_adapter=True, reduction_factor=8)],
                  "add_fusions": [{"adapters": ["h", "p"], "config": "static", "random": {**RANDOM, "seed": 7}}],
                  "active": {"fuse": ["h", "p"]}, "output": str(tmp / "eager-fusion-static.safetensors"),
                  "save_adapters": [{"name": n, "dir": str(tmp / f"eager-fusion-static-{n}")} for n in ("h", "p")],
                  "save_fusions": [{"adapters": ["h", "p"], "dir": str(tmp / "eager-fusion-static-h,p")}]})
    # Directories written here, as another writer (pypeft) would: the fewest config
    # fields the library accepts, with the right keys and with misnamed ones.
    for cid, rename in (("minimal", None), ("misnamed", ("adapter_up", "up_proj"))):
        _write_adapter(tmp / cid, "m", rename)
        cases.append({"id": cid, **common, "load_adapters": [{"dir": str(tmp / cid)}], "active": "m",
                      "output": str(tmp / f"{cid}.safetensors")})

    # Hooked eager reference on the transformers-5 models, every family and preset.
    for fam in CROSS_FAMILIES:
        for preset in PRESETS:
            cid = f"hooks-{fam}-{preset}"
            cases.append({"id": cid, "model_dir": str(tmp / fam), "inputs": str(tmp / f"{fam}-in.safetensors"),
                          "model_class": HEAD_CLASS[fam], "add_adapters": [_adapter("a", preset, 8)], "active": "a",
                          "output": str(tmp / f"{cid}.safetensors"),
                          "save_adapters": [{"name": "a", "dir": str(tmp / cid), "use_safetensors": True,
                                             "with_head": False}]})
    cid = "hooks-gpt2-fusion"
    cases.append({"id": cid, "model_dir": str(tmp / "gpt2"), "inputs": str(tmp / "gpt2-in.safetensors"),
                  "model_class": "AutoModelForCausalLM",
                  "add_adapters": [_adapter("a", "double_seq_bn", 9), _adapter("b", "double_seq_bn", 10)],
                  "add_fusions": [{"adapters": ["a", "b"], "config": "dynamic", "random": {**RANDOM, "seed": 11}}],
                  "active": {"fuse": ["a", "b"]}, "output": str(tmp / f"{cid}.safetensors"),
                  "save_adapters": [{"name": n, "dir": str(tmp / f"{cid}-{n}"), "with_head": False} for n in "ab"],
                  "save_fusions": [{"adapters": ["a", "b"], "dir": str(tmp / f"{cid}-a,b")}]})
    return cases, expected


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters-oracle")
    cases, expected = _cases(tmp)
    return tmp, run_oracle(cases, tmp), expected


@pytest.mark.parametrize("init", [False, True], ids=["plain", "adapters.init"])
@pytest.mark.parametrize("kind", ["head", "base"])
@pytest.mark.parametrize("fam", CROSS_FAMILIES)
def test_models_cross_from_transformers5(oracle, fam, kind, init):
    tmp, res, expected = oracle
    case = res["cases"][f"{fam}-{kind}-init{int(init)}"]
    info = case["base_loading_info"]
    # The bare base model leaves the saved head out (unexpected keys); RoBERTa's
    # classifier model has no pooler, which AutoModel then makes afresh (missing
    # keys that last_hidden_state does not use). Nothing else may differ.
    missing = [k for k in info["missing_keys"] if not (kind == "base" and k.startswith("pooler."))]
    assert not (missing or info["mismatched_keys"] or (kind == "head" and info["unexpected_keys"])), info
    got = read_output(tmp / f"{fam}-{kind}-init{int(init)}.safetensors")
    torch.testing.assert_close(got, expected[f"{fam}-{kind}"])


@pytest.mark.parametrize("fam,preset,safe", ROUND_TRIP, ids=[f"{f}-{p}" for f, p, _ in ROUND_TRIP])
def test_library_round_trip(oracle, fam, preset, safe):
    tmp, res, expected = oracle
    cid = f"rt-{fam}-{preset}"
    saved = res["cases"][cid + "-save"]["saved"][0]
    weights = "adapter.safetensors" if safe else "pytorch_adapter.bin"
    assert weights in saved["files"] and "adapter_config.json" in saved["files"]
    loaded = res["cases"][cid + "-load"]["loaded"][0]
    assert loaded["check"] == {"weights_file": weights, "missing": [], "unexpected": [], "values_differ": []}
    # The head was saved beside it (FORMAT.md) and loaded back, every tensor of it.
    head = loaded["head"]
    assert head["equal"] and head["values_differ"] == head["unexpected"] == [], head
    before, after = read_output(tmp / f"{cid}-save.safetensors"), read_output(tmp / f"{cid}-load.safetensors")
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # The adapter changes the output (random weights): the round trip is not vacuous.
    assert not torch.allclose(before, expected[f"{fam}-head"], atol=1e-3)


def test_library_fusion_round_trip(oracle):
    tmp, res, expected = oracle
    loaded = res["cases"]["rt-fusion-load"]["loaded"]
    assert [entry["name"] for entry in loaded] == ["a", "b", "a,b"]
    for entry in loaded:
        assert entry["check"]["missing"] == entry["check"]["unexpected"] == entry["check"]["values_differ"] == []
    before = read_output(tmp / "rt-fusion-save.safetensors")
    torch.testing.assert_close(read_output(tmp / "rt-fusion-load.safetensors"), before, rtol=0, atol=0)
    assert not torch.allclose(before, expected["bert-base"], atol=1e-3)


def _saved(directory):
    """The tensors and config of a library save (either weights file)."""
    directory = str(directory)
    for name in ("adapter.safetensors", "model_adapter_fusion.safetensors"):
        if os.path.exists(os.path.join(directory, name)):
            tensors = load_file(os.path.join(directory, name))
            break
    else:
        name = next(n for n in ("pytorch_adapter.bin", "pytorch_model_adapter_fusion.bin")
                    if os.path.exists(os.path.join(directory, n)))
        tensors = torch.load(os.path.join(directory, name), weights_only=True)
    config_file = "adapter_config.json" if "adapter" in name and "fusion" not in name else "adapter_fusion_config.json"
    with open(os.path.join(directory, config_file)) as f:
        return tensors, json.load(f)


def _bert(tmp, **adapters):
    base = load_file(str(tmp / "bert" / "model.safetensors"))
    batch = load_file(str(tmp / "bert-in.safetensors"))
    return RB.bert_forward(base, BERT_CONFIG, batch["input_ids"], batch["attention_mask"], **adapters)


BERT_CONFIG = T.bert().config


@pytest.mark.parametrize("name", list(EAGER))
def test_eager_reference_matches_library(oracle, name):
    tmp, res, expected = oracle
    tensors, saved = _saved(tmp / f"eager-{name}")
    got = _bert(tmp, adapters={"a": (saved["config"], RB.adapter_layers(tensors, "a"))}, active="a")
    library = read_output(tmp / f"eager-{name}.safetensors")
    torch.testing.assert_close(got, library)
    assert not torch.allclose(library, expected["bert-base"], atol=1e-3)


def test_eager_reference_without_adapters_is_the_base_model(oracle):
    tmp, res, expected = oracle
    torch.testing.assert_close(_bert(tmp), expected["bert-base"])


@pytest.mark.parametrize("case,names", [("rt-fusion-save", ("a", "b")), ("eager-fusion-static", ("h", "p"))],
                         ids=["dynamic", "static"])
def test_eager_fusion_matches_library(oracle, case, names):
    tmp, res, expected = oracle
    saved = {s["dir"]: s for s in res["cases"][case]["saved"]}
    adapters, fusion_dir = {}, None
    for directory, entry in saved.items():
        if "adapter_fusion_config.json" in entry["files"]:
            fusion_dir = directory
        else:
            tensors, cfg = _saved(directory)
            adapters[cfg["name"]] = (cfg["config"], RB.adapter_layers(tensors, cfg["name"]))
    ftensors, fcfg = _saved(fusion_dir)
    assert fcfg["adapter_names"] == list(names)
    fusion = (fcfg["adapter_names"], fcfg["config"], RB.fusion_layers(ftensors, fcfg["name"]))
    got = _bert(tmp, adapters=adapters, fusion=fusion)
    torch.testing.assert_close(got, read_output(tmp / f"{case}.safetensors"))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fam", CROSS_FAMILIES)
def test_hooked_reference_matches_library(oracle, fam, preset):
    """FORMAT.md's places, per family: the transformers-5 model with the
    library's adapter computed in hooks gives the library's logits."""
    tmp, res, expected = oracle
    cid = f"hooks-{fam}-{preset}"
    tensors, saved = _saved(tmp / cid)
    model = T.make(fam)
    batch = {k: v for k, v in load_file(str(tmp / f"{fam}-in.safetensors")).items()}
    with RB.eager_hooks(model, {"a": (saved["config"], RB.adapter_layers(tensors, "a"))}, active="a"):
        got = T.output(model, batch)
    library = read_output(tmp / f"{cid}.safetensors")
    torch.testing.assert_close(got, library)
    assert not torch.allclose(library, expected[f"{fam}-head"], atol=1e-3)
    torch.testing.assert_close(T.output(model, batch), expected[f"{fam}-head"])  # the hooks are gone


def test_hooked_fusion_matches_library(oracle):
    tmp, res, expected = oracle
    cid = "hooks-gpt2-fusion"
    adapters = {}
    for n in "ab":
        tensors, cfg = _saved(tmp / f"{cid}-{n}")
        adapters[n] = (cfg["config"], RB.adapter_layers(tensors, n))
    ftensors, fcfg = _saved(tmp / f"{cid}-a,b")
    model = T.make("gpt2")
    batch = load_file(str(tmp / "gpt2-in.safetensors"))
    with RB.eager_hooks(model, adapters, fusion=(["a", "b"], fcfg["config"], RB.fusion_layers(ftensors, "a,b"))):
        got = T.output(model, batch)
    torch.testing.assert_close(got, read_output(tmp / f"{cid}.safetensors"))


def test_minimal_config_takes_bnconfig_defaults(oracle):
    """FORMAT.md: fields a config leaves out take BnConfig's defaults (not a
    preset's), and nothing about the model is checked."""
    tmp, res, expected = oracle
    case = res["cases"]["minimal"]
    assert case["loaded"][0]["check"]["missing"] == case["loaded"][0]["check"]["unexpected"] == []
    config = case["adapter_configs"]["m"]
    assert config["original_ln_before"] is False and config["scaling"] == 1.0 and config["is_parallel"] is False
    tensors, _ = _saved(tmp / "minimal")
    got = _bert(tmp, adapters={"m": (config, RB.adapter_layers(tensors, "m"))}, active="m")
    torch.testing.assert_close(got, read_output(tmp / "minimal.safetensors"))


def test_misnamed_keys_load_silently_and_the_check_says_so(oracle):
    """The library loads non-strictly: a misnamed file "loads"; the driver's check
    names the keys, so tests of pypeft's files can tell."""
    tmp, res, expected = oracle
    check = res["cases"]["misnamed"]["loaded"][0]["check"]
    assert sorted(k.split(".adapters.m.")[1] for k in check["unexpected"]) == sorted(["up_proj.bias", "up_proj.weight"] * 2)
    assert sorted(k.split(".adapters.m.")[1] for k in check["missing"]) == sorted(["adapter_up.bias", "adapter_up.weight"] * 2)
