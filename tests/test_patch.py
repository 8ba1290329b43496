"""pypeft.patch and the lifecycle of a patched model, on tiny models of every
family we support (built from configs), against the unpatched model."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import pypeft
import tiny_models as T
from pypeft.methods.lora import LoraLinear

FAMILIES = list(T.FAMILIES)
DEFAULT_TARGETS = {"bert": {"query", "value"}, "roberta": {"query", "value"}, "gpt2": {"c_attn"},
                   "llama": {"q_proj", "v_proj"}, "t5": {"q", "v"}}


def randomize_adapters(model, seed=0):
    """Non-zero B (and fresh A) so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_and_freezing(family):
    model = T.make(family)
    base_params = {n for n, _ in model.named_parameters()}
    pypeft.patch(model, method="lora", r=4, alpha=8)
    layers = lora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == DEFAULT_TARGETS[family]
    if family == "gpt2":
        assert all(isinstance(m.base_layer, Conv1D) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 2 * len(layers)
    heads = trainable - adapters
    if family in ("bert", "roberta"):  # the classifier head stays trainable, as PEFT does for SEQ_CLS
        assert heads and all(n.startswith("classifier.copies.default.") for n in heads)
    else:
        assert not heads
    # every parameter the model had is frozen (under its new name)
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if n.replace(".base_layer", "").replace(".original_module", "") in base_params)
    trainable_count, total = pypeft.trainable_parameters(model)
    assert trainable_count == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_lifecycle_merge_unmerge_disabled(family):
    base = T.make(family)
    original_state = {k: v.clone() for k, v in base.state_dict().items()}
    batch = T.inputs(family)
    base_out = T.output(base, batch)

    model = base  # patched in place
    pypeft.patch(model, method="lora", r=4, alpha=8, target_modules="all-linear")
    # B = 0: the frozen product is computed exactly as nn.Linear does.
    assert torch.equal(T.output(model, batch), base_out)
    randomize_adapters(model)
    adapted = T.output(model, batch)
    assert (adapted - base_out).abs().max() > 1e-3

    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), base_out)
    assert torch.equal(T.output(model, batch), adapted)

    pypeft.merge(model)
    assert all(m.merged == ["default"] for m in lora_layers(model).values())
    torch.testing.assert_close(T.output(model, batch), adapted, atol=1e-5, rtol=1e-5)
    with pypeft.disabled(model):  # merged weights are taken out for the block
        torch.testing.assert_close(T.output(model, batch), base_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(T.output(model, batch), adapted, atol=1e-5, rtol=1e-5)
    pypeft.unmerge(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, original_state[f"{name}.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(T.output(model, batch), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_the_original_exactly(family):
    model = T.make(family)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    original_types = {n: type(m) for n, m in model.named_modules()}
    model.encoder.requires_grad_(False) if family == "t5" else None  # a flag the user set stays set
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pypeft.patch(model, method="lora", r=4, alpha=8, target_modules="all-linear", dropout=0.1)
    pypeft.patch(model, method="lora", r=2, alpha=2, adapter_name="second")
    randomize_adapters(model)
    model.train()
    loss = model(**T.labels_for(family, T.inputs(family))).loss
    loss.backward()
    pypeft.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    state = model.state_dict()
    assert state.keys() == original_state.keys()
    for k, v in original_state.items():
        assert torch.equal(state[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "pypeft" not in model.__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_only_adapter_and_head(family):
    model = T.make(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pypeft.patch(model, method="lora", r=4, alpha=8, dropout=0.1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = T.labels_for(family, T.inputs(family))
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if ".lora_" in n or ".copies." in n}
    for n, p in model.named_parameters():
        original = n.replace(".base_layer", "").replace(".original_module", "")
        if n in changed:
            continue
        assert torch.equal(p, before[original]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if ".lora_B." in n)


def test_target_module_forms():
    model = T.make("bert")
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    all_linear = lora_layers(pypeft.patch(copy.deepcopy(model), method="lora", target_modules="all-linear"))
    assert len(all_linear) == n_linear - 1 and "classifier" not in all_linear  # every linear but the head
    by_suffix = lora_layers(pypeft.patch(copy.deepcopy(model), method="lora", target_modules=["key", "output.dense"]))
    assert {n.split("layer.")[1].split(".", 1)[1] for n in by_suffix} == {"attention.self.key", "attention.output.dense",
                                                                          "output.dense"}
    by_regex = lora_layers(pypeft.patch(copy.deepcopy(model), method="lora", target_modules=r".*layer\.0\..*query"))
    assert list(by_regex) == ["bert.encoder.layer.0.attention.self.query"]
    gpt = lora_layers(pypeft.patch(T.make("gpt2"), method="lora", target_modules="all-linear"))
    assert "lm_head" not in gpt and {n.rsplit(".", 1)[-1] for n in gpt} == {"c_attn", "c_proj", "c_fc"}


def test_any_model_of_linear_layers_with_explicit_targets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), Conv1D(4, 16)))
    x = torch.randn(3, 8)
    base_out = mlp(x)
    pypeft.patch(mlp, method="lora", r=2, alpha=4, target_modules=["0", "2.0", "2.1"])
    assert set(lora_layers(mlp)) == {"0", "2.0", "2.1"}
    randomize_adapters(mlp)
    out = mlp(x)
    with torch.no_grad():  # the reference: W + s·BA folded into each layer by hand
        ref = copy.deepcopy(mlp)
        for layer in lora_layers(ref).values():
            delta = layer.scaling["default"] * layer.lora_B["default"] @ layer.lora_A["default"]
            w = layer.base_layer.weight
            w += delta.t() if isinstance(layer.base_layer, Conv1D) else delta
        pypeft.unpatch(ref)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, base_out)


def test_several_named_adapters():
    model = T.make("llama")
    batch = T.inputs("llama")
    base_out = T.output(model, batch)
    pypeft.patch(model, method="lora", r=4, alpha=8, adapter_name="a")
    randomize_adapters(model, seed=1)
    out_a = T.output(model, batch)
    pypeft.patch(model, method="lora", r=2, alpha=2, adapter_name="b", target_modules=["k_proj", "v_proj"])
    assert model.pypeft.active == "b"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B.b" in n:
                p.normal_()
    out_b = T.output(model, batch)
    assert not torch.allclose(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in n for n in trainable)  # only the active adapter trains
    pypeft.set_adapter(model, "a")
    assert torch.equal(T.output(model, batch), out_a)
    assert all(".a" in n for n, p in model.named_parameters() if p.requires_grad)
    pypeft.delete_adapter(model, "a")
    assert model.pypeft.active == "b" and torch.equal(T.output(model, batch), out_b)
    with pytest.raises(ValueError, match="only adapter.*unpatch"):
        pypeft.delete_adapter(model, "b")
    pypeft.unpatch(model)
    assert torch.equal(T.output(model, batch), base_out)


def test_config_object_and_rslora():
    model = T.make("bert")
    pypeft.patch(model, pypeft.LoraConfig(r=16, alpha=8, rslora=True, target_modules=["query"]))
    layer = next(iter(lora_layers(model).values()))
    assert layer.scaling["default"] == pytest.approx(8 / 4)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda m: pypeft.patch(m, method="lora", target_modules=["nope"]), ValueError,
     r"'target_modules'.*matched no linear layer.*query.*value"),
    (lambda m: pypeft.patch(m, method="lora", target_modules=["LayerNorm"]), ValueError, r"LayerNorm.*linear layers only"),
    (lambda m: pypeft.patch(m, method="lora", target_modules="(unclosed"), ValueError, r"not a valid regular expression"),
    (lambda m: pypeft.patch(m, method="lorax"), ValueError, r"'method'.*\['bitfit', 'bottleneck', 'fusion', 'lora', 'p_tuning', 'prefix_tuning', 'prompt_tuning', 'read', 'tokentune', 'vera'\].*'lorax'"),
    (lambda m: pypeft.patch(m, method="lora", rank=4), ValueError, r"unknown option 'rank'.*alpha"),
    (lambda m: pypeft.patch(m, method="lora", r=0), ValueError, r"'r'.*>= 1.*0"),
    (lambda m: pypeft.patch(m, method="lora", dropout=1.5), ValueError, r"'dropout'"),
    (lambda m: pypeft.patch(m, method="lora", modules_to_save=["head"]), ValueError, r"'modules_to_save'.*'head'"),
    (lambda m: pypeft.patch(m, 42), TypeError, r"'config'"),
    (lambda m: pypeft.merge(m), ValueError, r"not patched"),
])
def test_bad_input_raises_and_changes_nothing(call, exc, pattern):
    model = T.make("bert")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=pattern):
        call(model)
    assert "pypeft" not in model.__dict__
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_name_in_use():
    model = pypeft.patch(T.make("bert"), method="lora")
    with pytest.raises(ValueError, match="'adapter_name'.*'default' exists already"):
        pypeft.patch(model, method="lora")
    with pytest.raises(ValueError, match="'name'.*'nope'"):
        pypeft.set_adapter(model, "nope")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_compiled_training_step_matches_eager(family):
    torch._dynamo.reset()
    model = T.make(family)
    pypeft.patch(model, method="lora", r=4, alpha=8, target_modules="all-linear")
    randomize_adapters(model)
    model.train()
    for m in model.modules():  # dropout off everywhere so eager and compiled see the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    batch = T.labels_for(family, T.inputs(family))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(m):
        loss = m(**batch).loss
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    eager_loss, eager_grads = step(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_transformers_trainer_trains_a_patched_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = pypeft.patch(T.make("bert"), method="lora", r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, T.VOCAB, (6,), generator=g), "labels": torch.tensor(i % 3)}
            for i in range(16)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 4
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items())
