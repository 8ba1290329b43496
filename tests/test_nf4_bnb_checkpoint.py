"""4-bit checkpoints both ways between pypeft and transformers + bitsandbytes
(on the CPU): what pypeft saves, transformers + bnb load with equal
dequantised weights and outputs; what they save, pypeft loads (from_pretrained
or load_state_dict into a quantised model of the same architecture)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import pypeft
import tiny_models
from nf4_helpers import (bnb_config, bnb_dequantized, bnb_layers, bnb_reference_path, dequantized_model,
                         requires_bnb, state_dict_differences)
from pypeft import quant
from pypeft.quant import FormatError, NF4Linear

pytestmark = requires_bnb

AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
        "t5": transformers.AutoModelForSeq2SeqLM, "bert": transformers.AutoModelForSequenceClassification}


def _outputs_close(a, b, family):
    batch = tiny_models.inputs(family)
    torch.testing.assert_close(tiny_models.output(a, batch), tiny_models.output(b, batch))


@pytest.mark.parametrize("family,options", [
    ("llama", {}),
    ("llama", {"double_quant": False, "blocksize": 128}),
    ("gpt2", {}),
    ("t5", {}),
    ("bert", {"compute_dtype": torch.bfloat16}),
])
def test_transformers_bnb_load_what_pypeft_saves(tmp_path, family, options):
    model = pypeft.quantize(tiny_models.make(family), **options)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "bitsandbytes" and stored["bnb_4bit_quant_type"] == "nf4"
    loaded = AUTO[family].from_pretrained(tmp_path)  # bitsandbytes' deserialiser, as for any bnb checkpoint
    layers = bnb_layers(loaded)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert sorted(layers) == sorted(ours)
    for name, layer in layers.items():
        assert layer.weight.quant_state.blocksize == ours[name].blocksize
        assert torch.equal(bnb_dequantized(layer), ours[name].dequantized_weight()), name
    assert layers[name].compute_dtype == ours[name].compute_dtype
    assert state_dict_differences(loaded.state_dict(), model.state_dict()) == []
    _outputs_close(model, dequantized_model(loaded), family)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_pypeft_loads_what_transformers_bnb_save(tmp_path, family, double_quant):
    tiny_models.make(family).save_pretrained(tmp_path / "fp")
    theirs = AUTO[family].from_pretrained(tmp_path / "fp", quantization_config=bnb_config(double_quant))
    theirs.save_pretrained(tmp_path / "bnb")
    ours = quant.from_pretrained(AUTO[family], tmp_path / "bnb")
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, NF4Linear)) == sorted(bnb_layers(theirs))
    assert state_dict_differences(ours.state_dict(), theirs.state_dict()) == []
    _outputs_close(ours, dequantized_model(theirs), family)
    # or into a model quantised by pypeft, of the same architecture
    if family != "bert":  # (bnb quantises BERT's classifier, pypeft leaves it: the layouts differ there)
        into = pypeft.quantize(AUTO[family].from_pretrained(tmp_path / "fp"), double_quant=not double_quant)
        result = into.load_state_dict(load_file(tmp_path / "bnb" / "model.safetensors"), strict=False)
        assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}  # GPT-2's is tied
        assert state_dict_differences(into.state_dict(), theirs.state_dict()) == []


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_forward_runs_pypeft_checkpoint(tmp_path, compute_dtype):
    # Widths that are multiples of 64 (nf4_helpers: where bnb's native CPU
    # dequantiser is right), so bnb's own forward is the oracle here.
    config = tiny_models.make("llama").config
    config.intermediate_size = 128
    torch.manual_seed(0)
    model = pypeft.quantize(transformers.LlamaForCausalLM(config).eval(), compute_dtype=compute_dtype)
    model.save_pretrained(tmp_path)
    loaded = bnb_reference_path(transformers.AutoModelForCausalLM.from_pretrained(tmp_path))
    batch = tiny_models.inputs("llama")
    tol = dict(rtol=1e-2, atol=1e-2) if compute_dtype == torch.bfloat16 else {}
    torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(loaded, batch), **tol)


def test_pypeft_round_trip_and_compute_dtype_from_the_checkpoint(tmp_path):
    model = pypeft.quantize(tiny_models.make("llama"), compute_dtype=torch.bfloat16, blocksize=256)
    model.save_pretrained(tmp_path)
    loaded = quant.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert state_dict_differences(loaded.state_dict(), model.state_dict()) == []
    assert loaded.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.blocksize == 256
    _outputs_close(model, loaded, "llama")


def test_fp4_checkpoint_is_refused(tmp_path):
    tiny_models.make("llama").save_pretrained(tmp_path / "fp")
    fp4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp",
                                                            quantization_config=bnb_config(quant_type="fp4"))
    fp4.save_pretrained(tmp_path / "fp4")
    with pytest.raises(FormatError, match="FP4 checkpoint.*NF4 only"):
        quant.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "fp4")
    model = pypeft.quantize(tiny_models.make("llama"))
    with pytest.raises(RuntimeError, match="quant_type: expected 'nf4'.*got 'fp4'"):
        model.load_state_dict(load_file(tmp_path / "fp4" / "model.safetensors"))
