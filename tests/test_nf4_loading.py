"""Quantising as a model loads (pypeft.quant.from_pretrained on a
full-precision checkpoint, one tensor at a time): the same codes as loading
it whole and calling pypeft.quantize; random initialisation quantised layer
by layer (pypeft.quant.from_config)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import pypeft
import tiny_models
from nf4_helpers import state_dict_differences
from pypeft import quant
from pypeft.quant import NF4Linear

AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
        "t5": transformers.AutoModelForSeq2SeqLM, "llama-cls": transformers.AutoModelForSequenceClassification}


@pytest.mark.parametrize("family", sorted(AUTO))
def test_streamed_load_equals_load_then_quantize(tmp_path, family):
    tiny_models.make(family).save_pretrained(tmp_path)
    streamed = quant.from_pretrained(AUTO[family], tmp_path)
    reference = pypeft.quantize(AUTO[family].from_pretrained(tmp_path))
    assert state_dict_differences(streamed.state_dict(), reference.state_dict()) == []
    assert not streamed.training
    batch = tiny_models.inputs(family.removesuffix("-cls"))
    torch.testing.assert_close(tiny_models.output(streamed, batch), tiny_models.output(reference, batch),
                               rtol=0, atol=0)
    assert streamed.config.quantization_config.to_dict() == reference.config.quantization_config.to_dict()


def test_sharded_checkpoint_options_and_dtype(tmp_path):
    tiny_models.make("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    options = dict(double_quant=False, blocksize=128, skip=["o_proj"], compute_dtype=torch.float32)
    streamed = quant.from_pretrained(transformers.LlamaForCausalLM, tmp_path, dtype=torch.bfloat16, **options)
    reference = pypeft.quantize(transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16),
                                **options)
    assert state_dict_differences(streamed.state_dict(), reference.state_dict()) == []
    assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16
    assert type(streamed.model.layers[0].self_attn.o_proj) is nn.Linear
    layer = streamed.model.layers[0].self_attn.q_proj
    assert layer.weight_dtype == torch.bfloat16 and layer.compute_dtype == torch.float32 and layer.blocksize == 128
    assert torch.equal(streamed.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_tied_head_is_tied_after_loading(tmp_path):
    tiny_models.make("gpt2").save_pretrained(tmp_path)
    model = quant.from_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_random_init_quantised_layer_by_layer(family):
    config = tiny_models.make(family).config
    torch.manual_seed(0)
    model = quant.from_config(type(tiny_models.make(family)), config)
    torch.manual_seed(0)
    again = quant.from_config(type(tiny_models.make(family)), config)
    assert state_dict_differences(model.state_dict(), again.state_dict()) == []  # seeded: reproducible
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # transformers' own init (the oracle for the layout and each layer's scale; GPT-2 scales c_proj)
    torch.manual_seed(1)
    plain = type(tiny_models.make(family))(config)
    plain_weights = {n: (m.weight.t() if type(m).__name__ == "Conv1D" else m.weight) for n, m in plain.named_modules()
                     if type(m).__name__ in ("Linear", "Conv1D")}
    assert sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear)) == \
        sorted(n for n, m in pypeft.quantize(plain).named_modules() if isinstance(m, NF4Linear))
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            std, ref = m.dequantized_weight().std(), plain_weights[name].std()
            assert 0.8 * ref < std < 1.2 * ref, (name, std, ref)
            if m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias))
    norms = [m.weight for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)
    out = tiny_models.output(model, tiny_models.inputs(family))
    assert out.isfinite().all()


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="argument 'path': expected a directory with model.safetensors"):
        tiny_models.make("llama").config.save_pretrained(tmp_path)
        quant.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    config = tiny_models.make("llama").config
    with pytest.raises(ValueError, match="argument 'blocksize'.*got 7"):
        quant.from_config(transformers.LlamaForCausalLM, config, blocksize=7)
    with pytest.raises(TypeError, match="argument 'dtype'.*got torch.int64"):
        quant.from_config(transformers.LlamaForCausalLM, config, dtype=torch.int64)
    with pytest.raises(ValueError, match="argument 'device'.*got 'nowhere'"):
        quant.from_config(transformers.LlamaForCausalLM, config, device="nowhere")
