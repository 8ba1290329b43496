"""The `adapters` library (AdapterHub) as an oracle, checked on its own before any
pypeft method leans on it: models saved by this venv's transformers 5 load in
the oracle's transformers 4.57 with the same outputs; the library's adapters
survive its own save/load; and a plain-PyTorch reading of its math
(tests/reference_bottleneck.py) reproduces its outputs. Every case of this
module runs in one oracle subprocess (the `oracle` fixture)."""

import pytest
import torch
from safetensors.torch import load_file

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
EAGER_PRESETS = ["seq_bn", "double_seq_bn", "par_bn"]
RANDOM = {"std": 0.2}


def _adapter(name, preset, seed, **overrides):
    return {"name": name, "config": preset, "overrides": overrides, "random": {**RANDOM, "seed": seed}}


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
    for preset in EAGER_PRESETS:
        cid = f"eager-{preset}"
        cases.append({"id": cid, **common, "add_adapters": [_adapter("a", preset, 4)], "active": "a",
                      "output": str(tmp / f"{cid}.safetensors"),
                      "save_adapters": [{"name": "a", "dir": str(tmp / cid), "use_safetensors": True}]})
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


@pytest.mark.parametrize("preset", EAGER_PRESETS)
def test_eager_reference_matches_library(oracle, preset):
    tmp, res, expected = oracle
    cid = f"eager-{preset}"
    saved = res["cases"][cid]["saved"][0]
    config = saved["configs"]["adapter_config.json"]["config"]
    adapter = load_file(str(tmp / cid / "adapter.safetensors"))
    base = load_file(str(tmp / "bert" / "model.safetensors"))
    batch = load_file(str(tmp / "bert-in.safetensors"))
    got = RB.bert_forward(base, T.make("bert").config, batch["input_ids"], batch["attention_mask"],
                          adapters={"a": (config, RB.adapter_layers(adapter, "a"))}, active="a")
    oracle_out = read_output(tmp / f"{cid}.safetensors")
    torch.testing.assert_close(got, oracle_out)
    # Without the adapter the same function gives the base model (it is no copy of the oracle's output).
    plain = RB.bert_forward(base, T.make("bert").config, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(plain, expected["bert-base"])
    assert not torch.allclose(plain, oracle_out, atol=1e-3)
