"""pypeft.quantize(model, "nf4") against transformers + bitsandbytes quantising
the same checkpoint (the oracle): the same layers in 4 bits, the same bytes;
before and after pypeft.patch (unpatch gives back the quantised layers);
odd widths, skip lists, bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import pypeft
import tiny_models
from nf4_helpers import bnb_config, dequantized_model, requires_bnb, state_dict_differences
from pypeft.quant import NF4Linear

AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
        "opt": transformers.AutoModelForCausalLM, "t5": transformers.AutoModelForSeq2SeqLM,
        "llama-cls": transformers.AutoModelForSequenceClassification,
        "bert": transformers.AutoModelForSequenceClassification}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved once: {family: directory}."""
    root = tmp_path_factory.mktemp("nf4_fp")
    out = {}
    for family in AUTO:
        tiny_models.make(family).save_pretrained(root / family)
        out[family] = root / family
    return out


def _nf4_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear))


@requires_bnb
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "t5", "llama-cls"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_same_bytes_as_transformers_bitsandbytes(saved, family, double_quant):
    ours = pypeft.quantize(AUTO[family].from_pretrained(saved[family]), double_quant=double_quant)
    theirs = AUTO[family].from_pretrained(saved[family], quantization_config=bnb_config(double_quant))
    assert state_dict_differences(ours.state_dict(), theirs.state_dict()) == []
    assert _nf4_names(ours) == sorted(n for n, m in theirs.named_modules()
                                      if type(m).__name__ == "Linear4bit")
    batch = tiny_models.inputs(family.removesuffix("-cls"))
    torch.testing.assert_close(tiny_models.output(ours, batch), tiny_models.output(dequantized_model(theirs), batch))
    config = ours.config.quantization_config
    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
            config.bnb_4bit_quant_storage) == (True, "nf4", double_quant, torch.uint8)


@requires_bnb
def test_bert_classifier_stays_in_full_precision(saved):
    # transformers' get_keys_to_not_convert names the last *parameter*
    # (classifier.bias), which matches no module: bnb quantises BERT's head.
    # pypeft leaves the task head alone; every other layer is as bnb's.
    ours = pypeft.quantize(AUTO["bert"].from_pretrained(saved["bert"]))
    theirs = AUTO["bert"].from_pretrained(saved["bert"], quantization_config=bnb_config())
    assert type(ours.classifier) is nn.Linear
    assert ours.config.quantization_config.llm_int8_skip_modules == ["classifier"]
    a = {k: v for k, v in ours.state_dict().items() if not k.startswith("classifier.")}
    b = {k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier.")}
    assert state_dict_differences(a, b) == []


def test_keep_in_fp32_and_heads_and_compute_dtype():
    model = pypeft.quantize(tiny_models.make("t5"), compute_dtype=torch.bfloat16, blocksize=128)
    wo = [n for n, m in model.named_modules() if n.endswith("DenseReluDense.wo")]
    assert wo and all(type(model.get_submodule(n)) is nn.Linear for n in wo)  # T5's _keep_in_fp32_modules
    assert type(model.lm_head) is nn.Linear
    layer = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(layer, NF4Linear) and layer.compute_dtype == torch.bfloat16 and layer.blocksize == 128
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    assert sorted(model.config.quantization_config.llm_int8_skip_modules) == sorted(wo + ["lm_head"])


def test_skip_replaces_the_default_list():
    model = tiny_models.make("llama")
    # transformers' llm_int8_skip_modules rules: a suffix, or a prefix up to a module boundary
    pypeft.quantize(model, skip=["up_proj", "model.layers.1.mlp"])
    assert isinstance(model.lm_head, NF4Linear)  # asked for: the head too
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.o_proj, NF4Linear)
    tied = tiny_models.make("gpt2")  # lm_head shares the embeddings' weight: never quantised
    pypeft.quantize(tied, skip=[])
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.transformer.wte.weight


def test_odd_in_features_stay_full_precision_with_a_warning():
    model = tiny_models.make("llama")
    odd = nn.Linear(33, 64)
    model.model.layers[0].mlp.odd = odd
    with pytest.warns(UserWarning, match=r"odd in_features.*model\.layers\.0\.mlp\.odd"):
        pypeft.quantize(model)
    assert model.model.layers[0].mlp.odd is odd
    assert "model.layers.0.mlp.odd" in model.config.quantization_config.llm_int8_skip_modules


def test_subclasses_of_linear_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    pypeft.quantize(model)
    assert isinstance(model[0], NF4Linear) and type(model[1].out_proj) is not NF4Linear


def _unpatched_quantised(family="llama"):
    return pypeft.quantize(tiny_models.make(family))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantise_after_lora_patch_then_unpatch(family):
    reference = _unpatched_quantised(family)
    model = tiny_models.make(family)
    targets = ["q_proj", "v_proj", "up_proj"] if family == "llama" else ["c_attn", "c_fc"]
    pypeft.patch(model, method="lora", r=4, target_modules=targets)
    state = pypeft.state_of(model)
    pypeft.quantize(model)
    layers = [m for m in model.modules() if isinstance(m, pypeft.LoraLinear)]
    assert layers and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    assert all(isinstance(state.replaced[n], NF4Linear) for n in state.replaced)  # the record follows
    assert all(p.requires_grad for m in layers for p in m.lora_A.parameters())
    batch = tiny_models.inputs(family)
    with pypeft.disabled(model):
        torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(reference, batch),
                                   rtol=0, atol=0)
    pypeft.unpatch(model)
    assert _nf4_names(model) == _nf4_names(reference)
    assert state_dict_differences(model.state_dict(), reference.state_dict()) == []
    assert not any(isinstance(m, pypeft.PypeftLayer) for m in model.modules())
    torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(reference, batch), rtol=0, atol=0)


def test_patch_after_quantise_unpatch_gives_the_quantised_model():
    reference = _unpatched_quantised()
    model = _unpatched_quantised()
    pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=3)
    batch = tiny_models.inputs("llama")
    assert tiny_models.output(model, batch).isfinite().all()
    pypeft.unpatch(model)
    assert state_dict_differences(model.state_dict(), reference.state_dict()) == []
    torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(reference, batch), rtol=0, atol=0)


def test_quantise_after_patch_names_skip_by_model_names():
    model = tiny_models.make("llama")
    pypeft.patch(model, method="lora", r=4, target_modules=["q_proj", "v_proj"])
    pypeft.quantize(model, skip=["model.layers.0.self_attn.q_proj"])  # a name of the model, not '...base_layer'
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj.base_layer, NF4Linear)
    assert model.config.quantization_config.llm_int8_skip_modules == ["model.layers.0.self_attn.q_proj"]


def test_bad_arguments_change_nothing():
    model = tiny_models.make("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"argument 'method': expected one of \['nf4'\], got 'fp4'"):
        pypeft.quantize(model, "fp4")
    with pytest.raises(ValueError, match=r"argument 'blocksize': expected one of .*got 48"):
        pypeft.quantize(model, blocksize=48)
    with pytest.raises(TypeError, match="argument 'compute_dtype'.*got torch.int8"):
        pypeft.quantize(model, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="argument 'skip': expected a list.*got 'lm_head'"):
        pypeft.quantize(model, skip="lm_head")
    with pytest.raises(TypeError, match="argument 'double_quant': expected a bool"):
        pypeft.quantize(model, double_quant=1)
    with pytest.raises(TypeError, match="argument 'model': expected a torch.nn.Module, got str"):
        pypeft.quantize("model")
    assert state_dict_differences(model.state_dict(), before) == []
    pypeft.quantize(model)
    with pytest.raises(ValueError, match="quantised already"):
        pypeft.quantize(model)
    merged = tiny_models.make("llama")
    pypeft.patch(merged, method="lora", r=4)
    pypeft.merge(merged)
    with pytest.raises(ValueError, match="merged adapters.*unmerge"):
        pypeft.quantize(merged)


def test_bitfit_trains_the_bias_of_nf4_layers():
    reference = _unpatched_quantised("gpt2")
    model = _unpatched_quantised("gpt2")
    pypeft.patch(model, method="bitfit")
    batch = tiny_models.inputs("gpt2")
    torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(reference, batch), rtol=0, atol=0)
    layer = model.transformer.h[0].attn.c_attn  # a BitFit layer over an NF4Linear
    assert isinstance(layer.base_layer, NF4Linear)
    model.train()
    model(**tiny_models.labels_for("gpt2", batch)).loss.backward()
    trained = layer.bitfit_bias["default"]
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    with torch.no_grad():
        trained.add_(0.5)
    model.eval()
    expected = copy.deepcopy(reference)
    with torch.no_grad():
        expected.transformer.h[0].attn.c_attn.bias.add_(0.5)
    torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(expected, batch))
    pypeft.unpatch(model)
    assert state_dict_differences(model.state_dict(), reference.state_dict()) == []


def test_tokentune_layers_are_refused_with_the_order_that_works():
    model = tiny_models.make("llama")
    pypeft.patch(model, method="tokentune", k=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"run as another method's layers .*TokenTune.*quantise before patching"):
        pypeft.quantize(model)
    assert state_dict_differences(model.state_dict(), before) == []
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_no_reference_to_the_full_precision_layers_is_kept():
    import gc
    import weakref
    model = tiny_models.make("llama")
    pypeft.patch(model, method="lora", r=4)  # the PatchState records the replaced q_proj / v_proj
    linears = [weakref.ref(m) for m in model.modules() if type(m) is nn.Linear and m is not model.lm_head]
    pypeft.quantize(model)
    gc.collect()
    assert linears and all(r() is None for r in linears)
