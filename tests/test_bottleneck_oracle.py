"""Bottleneck adapters and AdapterFusion against the `adapters` library itself
(AdapterHub 1.3, in its own venv: tests/adapters_oracle), both ways:

- library -> pypeft: the library adds adapters (random weights, so the math
  shows), saves them, and runs the inputs; pypeft loads the directory into the
  same base model and must give the same outputs;
- pypeft -> library: pypeft patches, randomises and saves; the library loads
  the directory, checks every key landed, and runs the inputs.

Families: BERT, RoBERTa, DistilBERT (post-LN), GPT-2 and Llama (pre-LN);
presets seq_bn (pfeiffer), double_seq_bn (houlsby), par_bn (parallel), plus
overrides. All cases run in one oracle process (the module fixture)."""

from __future__ import annotations

import pytest
import torch

import pypeft
import tiny_models as T
from adapters_oracle import read_output, run_oracle, write_inputs
from test_bottleneck_patch import randomize

HEAD_CLASS = {"bert": "AutoModelForSequenceClassification", "roberta": "AutoModelForSequenceClassification",
              "distilbert": "AutoModelForSequenceClassification", "gpt2": "AutoModelForCausalLM",
              "llama": "AutoModelForCausalLM"}
FAMILIES = list(HEAD_CLASS)
PRESET = {"seq_bn": "pfeiffer", "double_seq_bn": "houlsby", "par_bn": "parallel"}
# (family, library preset, overrides, saved as safetensors)
FROM_LIBRARY = [(f, p, {}, f != "distilbert") for f in FAMILIES for p in PRESET] + [
    ("bert", "double_seq_bn", {"reduction_factor": {"0": 8, "default": 4}, "non_linearity": "gelu",
                               "scaling": 0.5, "leave_out": [0]}, True),
    ("llama", "seq_bn", {"non_linearity": "tanh", "original_ln_before": False}, True),
    ("roberta", "par_bn", {"scaling": 2.0, "mh_adapter": True}, False),
]
TO_LIBRARY = [(f, p, {}) for f in ("bert", "gpt2", "llama") for p in ("pfeiffer", "houlsby", "parallel")] + [
    ("distilbert", "houlsby", {"non_linearity": "gelu_new", "reduction_factor": 8}),
    ("roberta", "pfeiffer", {"leave_out": [1], "scaling": 3.0}),
]
HEADS = ["bert", "roberta", "distilbert"]  # classifiers whose trained head crosses in the library's head files
FUSIONS = [("bert", "seq_bn", "dynamic"), ("bert", "double_seq_bn", "static"), ("llama", "seq_bn", "dynamic")]
RANDOM = {"std": 0.2}


def _landed(loaded: dict) -> None:
    """Every tensor of the file found its place in the library's model, except
    the heads pypeft keeps under PEFT's prefix (the library's loader ignores
    them: its filter takes only '.adapters.<name>.' / fusion keys)."""
    check = loaded["check"]
    assert check["missing"] == check["values_differ"] == [], check
    assert all(k.startswith("base_model.model.") for k in check["unexpected"]), check


def _id(*parts) -> str:
    return "-".join(str(p) for p in parts).replace(" ", "")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bottleneck-oracle")
    cases, made = [], {}
    for fam in FAMILIES:
        model = T.make(fam)
        model.save_pretrained(tmp / fam)
        write_inputs(tmp / f"{fam}-in.safetensors", T.inputs(fam))
    common = lambda fam: {"model_dir": str(tmp / fam), "inputs": str(tmp / f"{fam}-in.safetensors"),  # noqa: E731
                          "model_class": HEAD_CLASS[fam]}

    for i, (fam, preset, overrides, safe) in enumerate(FROM_LIBRARY):
        cid = _id("from", fam, preset, i)
        cases.append({"id": cid, **common(fam), "active": "a", "output": str(tmp / f"{cid}.safetensors"),
                      "add_adapters": [{"name": "a", "config": preset, "overrides": overrides,
                                        "random": {**RANDOM, "seed": i}}],
                      "save_adapters": [{"name": "a", "dir": str(tmp / cid), "use_safetensors": safe}]})

    for i, (fam, preset, options) in enumerate(TO_LIBRARY):
        cid = _id("to", fam, preset, i)
        model = pypeft.patch(T.make(fam), method="bottleneck", preset=preset, adapter_name="mine", **options)
        randomize(model, seed=100 + i)
        pypeft.save_adapter(model, tmp / cid)
        made[cid] = T.output(model, T.inputs(fam))
        cases.append({"id": cid, **common(fam), "load_adapters": [{"dir": str(tmp / cid)}], "active": "mine",
                      "output": str(tmp / f"{cid}.safetensors")})

    for i, fam in enumerate(HEADS):
        cid = _id("head-from", fam)
        cases.append({"id": cid, **common(fam), "active": "a", "output": str(tmp / f"{cid}.safetensors"),
                      "add_adapters": [{"name": "a", "config": "seq_bn", "random": {**RANDOM, "seed": 600 + i}}],
                      "random_head": {**RANDOM, "seed": 700 + i},
                      "save_adapters": [{"name": "a", "dir": str(tmp / cid), "use_safetensors": True}]})
        cid = _id("head-to", fam)
        model = pypeft.patch(T.make(fam), method="bottleneck", preset="houlsby", adapter_name="mine")
        randomize(model, seed=800 + i)
        with torch.no_grad():
            g = torch.Generator().manual_seed(900 + i)
            for name, p in model.named_parameters():
                if ".copies.mine." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pypeft.save_adapter(model, tmp / cid)
        made[cid] = T.output(model, T.inputs(fam))
        cases.append({"id": cid, **common(fam), "load_adapters": [{"dir": str(tmp / cid)}], "active": "mine",
                      "output": str(tmp / f"{cid}.safetensors")})

    for i, (fam, preset, fusion) in enumerate(FUSIONS):
        cid = _id("fusion", fam, preset, fusion)
        dirs = {n: str(tmp / cid / n) for n in ("a", "b", "a,b")}
        (tmp / cid).mkdir()  # the library makes one level of directory, not its parents
        cases.append({"id": cid, **common(fam), "active": {"fuse": ["a", "b"]},
                      "output": str(tmp / f"{cid}.safetensors"),
                      "add_adapters": [{"name": "a", "config": preset, "random": {**RANDOM, "seed": 200 + i}},
                                       {"name": "b", "config": preset, "overrides": {"reduction_factor": 8},
                                        "random": {**RANDOM, "seed": 300 + i}}],
                      "add_fusions": [{"adapters": ["a", "b"], "config": fusion,
                                       "random": {"std": 0.1, "seed": 400 + i}}],
                      "save_adapters": [{"name": n, "dir": dirs[n], "use_safetensors": True} for n in ("a", "b")],
                      "save_fusions": [{"adapters": ["a", "b"], "dir": dirs["a,b"], "use_safetensors": True}]})
        # pypeft -> library: adapters and a fusion pypeft made and saved.
        cid = _id("fusion-to", fam, preset, fusion)
        model = T.make(fam)
        pypeft.patch(model, method="bottleneck", preset=PRESET[preset], adapter_name="a")
        pypeft.patch(model, method="bottleneck", preset=PRESET[preset], adapter_name="b", reduction_factor=8)
        pypeft.patch(model, method="fusion", adapters=["a", "b"], preset=fusion)
        randomize(model, seed=500 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".fusions." in name:
                    p.mul_(0.5)
        for name in ("a", "b", "fusion"):
            pypeft.save_adapter(model, tmp / cid / name, adapter_name=name)
        made[cid] = T.output(model, T.inputs(fam))
        cases.append({"id": cid, **common(fam), "active": {"fuse": ["a", "b"]},
                      "load_adapters": [{"dir": str(tmp / cid / n)} for n in ("a", "b")],
                      "load_fusions": [{"dir": str(tmp / cid / "fusion")}],
                      "output": str(tmp / f"{cid}.safetensors")})

    return tmp, run_oracle(cases, tmp), made


@pytest.mark.parametrize("case", range(len(FROM_LIBRARY)),
                         ids=[_id(f, p, *o) for f, p, o, _ in FROM_LIBRARY])
def test_library_adapter_loads_into_pypeft_with_equal_outputs(oracle, case):
    tmp, res, _ = oracle
    fam, preset, overrides, safe = FROM_LIBRARY[case]
    cid = _id("from", fam, preset, case)
    expected = read_output(tmp / f"{cid}.safetensors")
    model = pypeft.load_adapter(T.make(fam), tmp / cid)
    config = pypeft.state_of(model).adapters["default"].config
    assert config.non_linearity == overrides.get("non_linearity", config.non_linearity)
    got = T.output(model, T.inputs(fam))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    with pypeft.disabled(model):  # not vacuous: the adapter changes the output
        assert not torch.allclose(T.output(model, T.inputs(fam)), expected, atol=1e-3)


@pytest.mark.parametrize("case", range(len(TO_LIBRARY)), ids=[_id(f, p, *o) for f, p, o in TO_LIBRARY])
def test_pypeft_adapter_loads_into_the_library_with_equal_outputs(oracle, case):
    tmp, res, made = oracle
    fam, preset, _ = TO_LIBRARY[case]
    cid = _id("to", fam, preset, case)
    _landed(res["cases"][cid]["loaded"][0])
    torch.testing.assert_close(read_output(tmp / f"{cid}.safetensors"), made[cid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", range(len(FUSIONS)), ids=[_id(*f) for f in FUSIONS])
def test_library_fusion_loads_into_pypeft_with_equal_outputs(oracle, case):
    tmp, res, _ = oracle
    fam, preset, fusion = FUSIONS[case]
    cid = _id("fusion", fam, preset, fusion)
    expected = read_output(tmp / f"{cid}.safetensors")
    model = T.make(fam)
    for name in ("a", "b"):
        pypeft.load_adapter(model, tmp / cid / name, adapter_name=name)
    pypeft.load_adapter(model, tmp / cid / "a,b", adapter_name="fused")
    pypeft.set_adapter(model, "fused")
    got = T.output(model, T.inputs(fam))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    pypeft.set_adapter(model, "a")
    assert not torch.allclose(T.output(model, T.inputs(fam)), expected, atol=1e-3)



@pytest.mark.parametrize("case", range(len(FUSIONS)), ids=[_id(*f) for f in FUSIONS])
def test_pypeft_fusion_loads_into_the_library_with_equal_outputs(oracle, case):
    tmp, res, made = oracle
    cid = _id("fusion-to", *FUSIONS[case])
    for loaded in res["cases"][cid]["loaded"]:
        _landed(loaded)
    torch.testing.assert_close(read_output(tmp / f"{cid}.safetensors"), made[cid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fam", HEADS)
def test_a_trained_head_crosses_in_the_librarys_head_files(oracle, fam):
    tmp, res, made = oracle
    cid = _id("head-from", fam)
    assert "head_config.json" in res["cases"][cid]["saved"][0]["files"]
    model = pypeft.load_adapter(T.make(fam), tmp / cid)
    assert pypeft.state_of(model).adapters["default"].modules_to_save  # the head came along
    expected = read_output(tmp / f"{cid}.safetensors")
    torch.testing.assert_close(T.output(model, T.inputs(fam)), expected, atol=2e-5, rtol=1e-4)
    cid = _id("head-to", fam)
    _landed(res["cases"][cid]["loaded"][0])
    torch.testing.assert_close(read_output(tmp / f"{cid}.safetensors"), made[cid], atol=2e-5, rtol=1e-4)
    import shutil  # not vacuous: the same adapter without the library's head files gives other logits

    headless = tmp / f"{cid}-headless"
    shutil.copytree(tmp / _id("head-from", fam), headless)
    for name in ("head_config.json", "model_head.safetensors"):
        (headless / name).unlink()
    model = pypeft.load_adapter(T.make(fam), headless)
    assert not torch.allclose(T.output(model, T.inputs(fam)), expected, atol=1e-3)
