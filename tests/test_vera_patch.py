"""pypeft.patch(method="vera") against the real `peft` package: the same shared
random matrices from the same seed, the same outputs and gradients, adapters
moving both ways in PEFT's VeRA format, the lifecycle (merge, unmerge,
disabled, unpatch) and the errors of incompatible adapters."""

import copy

import pytest
import torch

import pypeft
import tiny_models as T
from pypeft.methods.vera import VeraLinear, projections_of

peft = pytest.importorskip("peft", reason="the `peft` package is the oracle for VeRA")

TASK = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
FAMILIES = ["bert", "gpt2", "llama", "t5"]
# Layers of different shapes, so the shared matrices are sliced differently per layer.
TARGETS = {"bert": ["query", "value", "intermediate.dense", "output.dense"], "gpt2": ["c_attn", "c_fc", "c_proj"],
           "llama": ["q_proj", "k_proj", "up_proj", "down_proj"], "t5": ["q", "v", "wi", "wo"]}


def peft_vera(base, family, **options):
    cfg = peft.VeraConfig(task_type=TASK[family], **options)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def set_lambdas(model, seed=0):
    """Random λ (and head) values, keyed by the layer's path so that a peft
    model and a pypeft model get the same ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = name.replace("base_model.model.", "").replace(".modules_to_save.", ".copies.")
            gen = torch.Generator().manual_seed(hash(key) % 2**31 + seed)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return g


def vera_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, VeraLinear)}


@pytest.mark.parametrize("family", FAMILIES)
def test_projections_are_peft_s_bit_for_bit(family):
    base = T.make(family)
    theirs = peft_vera(base, family, r=16, target_modules=TARGETS[family], projection_prng_key=7)
    ours = pypeft.patch(copy.deepcopy(base), method="vera", r=16, target_modules=TARGETS[family],
                        projection_seed=7)
    shared = projections_of(ours.pypeft)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])
    # Stored once: every layer holds the one module, so one storage.
    layers = vera_layers(ours)
    assert len(layers) == len([n for n, m in theirs.named_modules() if type(m).__name__ == "Linear"
                               and hasattr(m, "vera_lambda_d")])
    assert all(layer.projections is shared for layer in layers.values())
    assert len({layer.projections.vera_A.data_ptr() for layer in layers.values()}) == 1
    assert pypeft.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_starts_as_base_then_matches_peft_outputs_and_grads(family):
    base = T.make(family)
    batch = T.inputs(family)
    ours = pypeft.patch(copy.deepcopy(base), method="vera", r=16, target_modules=TARGETS[family])
    torch.testing.assert_close(T.output(ours, batch), T.output(base, batch), atol=0, rtol=0)
    theirs = peft_vera(base, family, r=16, target_modules=TARGETS[family])
    set_lambdas(ours), set_lambdas(theirs)
    want = T.output(theirs.eval(), batch)
    got = T.output(ours, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - T.output(base, batch)).abs().max() > 1e-3
    # Gradients of every λ equal peft's (eval mode: the models' own dropout off).
    labelled = T.labels_for(family, batch)
    ours(**labelled).loss.backward()
    theirs(**labelled).loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".modules_to_save.", ".copies."): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked == len(grads)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("save_projection", [True, False])
def test_adapters_move_both_ways(tmp_path, family, save_projection):
    base = T.make(family)
    batch = T.inputs(family)
    # peft -> pypeft
    theirs = peft_vera(base, family, r=8, target_modules=TARGETS[family], projection_prng_key=3,
                       save_projection=save_projection)
    set_lambdas(theirs, seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = pypeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(T.output(loaded, batch), T.output(theirs.eval(), batch), atol=1e-5, rtol=1e-5)
    # pypeft -> peft
    ours = pypeft.patch(copy.deepcopy(base), method="vera", r=8, target_modules=TARGETS[family],
                        projection_seed=5, save_projection=save_projection)
    set_lambdas(ours, seed=2)
    pypeft.save_adapter(ours, tmp_path / "ours")
    keys = set(__import__("safetensors.torch").torch.load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == save_projection
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    want = T.output(ours, batch)
    torch.testing.assert_close(T.output(back, batch), want, atol=1e-5, rtol=1e-5)
    assert (want - T.output(base, batch)).abs().max() > 1e-3


def test_saved_projections_are_used_over_the_seed(tmp_path):
    base = T.make("bert")
    ours = pypeft.patch(copy.deepcopy(base), method="vera", r=8, projection_seed=1)
    set_lambdas(ours)
    with torch.no_grad():
        projections_of(ours.pypeft).vera_A.mul_(-2.0)  # no longer what the seed draws
    pypeft.save_adapter(ours, tmp_path)
    loaded = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    batch = T.inputs("bert")
    torch.testing.assert_close(T.output(loaded, batch), T.output(ours, batch), atol=1e-6, rtol=1e-6)


def test_merge_unmerge_disabled_unpatch():
    base = T.make("llama")
    batch = T.inputs("llama")
    want_base = T.output(base, batch)
    model = pypeft.patch(copy.deepcopy(base), method="vera", r=16, target_modules=TARGETS["llama"])
    set_lambdas(model)
    adapted = T.output(model, batch)
    pypeft.merge(model)
    torch.testing.assert_close(T.output(model, batch), adapted, atol=1e-5, rtol=1e-5)
    with pypeft.disabled(model):
        torch.testing.assert_close(T.output(model, batch), want_base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(T.output(model, batch), adapted, atol=1e-5, rtol=1e-5)
    pypeft.unmerge(model)
    torch.testing.assert_close(T.output(model, batch), adapted, atol=1e-5, rtol=1e-5)
    pypeft.unpatch(model)
    assert not vera_layers(model)
    torch.testing.assert_close(T.output(model, batch), want_base, atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6) and p.requires_grad == q.requires_grad, n


def test_two_vera_adapters_share_the_matrices_and_switch():
    base = T.make("bert")
    batch = T.inputs("bert")
    model = pypeft.patch(copy.deepcopy(base), method="vera", r=16, adapter_name="one")
    pypeft.patch(model, method="vera", r=16, adapter_name="two")
    set_lambdas(model)  # only "two" is trainable, so only it changes
    layer = next(iter(vera_layers(model).values()))
    assert torch.all(layer.vera_lambda_b["one"] == 0)
    two = T.output(model, batch)
    pypeft.set_adapter(model, "one")
    torch.testing.assert_close(T.output(model, batch), T.output(base, batch), atol=1e-6, rtol=0)
    pypeft.set_adapter(model, "two")
    torch.testing.assert_close(T.output(model, batch), two, atol=0, rtol=0)
    pypeft.delete_adapter(model, "one")
    torch.testing.assert_close(T.output(model, batch), two, atol=0, rtol=0)


@pytest.mark.parametrize("second, pattern", [
    (dict(projection_seed=1), r"'projection_seed'.*expected 0.*got 1"),
    (dict(r=8), r"'r'.*expected 16.*got 8"),
    (dict(target_modules=["intermediate.dense"]), r"intermediate\.dense.*out=96.*out<=64"),
])
def test_incompatible_second_adapter_raises_and_changes_nothing(second, pattern):
    model = pypeft.patch(T.make("bert"), method="vera", r=16, target_modules=["query", "value"])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    options = {"r": 16, "adapter_name": "second", **second}
    with pytest.raises(ValueError, match=pattern):
        pypeft.patch(model, method="vera", **options)
    assert list(model.pypeft.adapters) == ["default"]
    assert set(model.state_dict()) == set(before)


def test_one_method_per_layer():
    model = pypeft.patch(T.make("bert"), method="lora", r=4)
    with pytest.raises(ValueError, match=r"holds lora adapters"):
        pypeft.patch(model, method="vera", r=16, adapter_name="v")
    # other layers take VeRA beside the LoRA ones
    pypeft.patch(model, method="vera", r=16, adapter_name="v", target_modules=["key"])
    assert model.pypeft.adapters["v"].layers and all(n.endswith(".key") for n in model.pypeft.adapters["v"].layers)


@pytest.mark.parametrize("options, pattern", [
    (dict(r=0), r"'r'.*>= 1.*got 0"), (dict(projection_seed=-1), r"'projection_seed'"),
    (dict(d_initial=float("nan")), r"'d_initial'"), (dict(dropout=1.0), r"'dropout'"),
    (dict(adapter_name="base"), r"'adapter_name'.*'base'"),
])
def test_bad_config(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        pypeft.VeraConfig(**options)


def test_loading_another_seed_s_adapter_beside_raises(tmp_path):
    base = T.make("bert")
    pypeft.save_adapter(pypeft.patch(copy.deepcopy(base), method="vera", r=8, projection_seed=1), tmp_path)
    model = pypeft.patch(copy.deepcopy(base), method="vera", r=8, projection_seed=2)
    with pytest.raises(ValueError, match=r"projection_seed|differ"):
        pypeft.load_adapter(model, tmp_path, adapter_name="other")
    assert list(model.pypeft.adapters) == ["default"]
