"""A LoRA adapter trained over pypeft's NF4 base is peft's QLoRA adapter: saved
in peft's format, it loads into peft over the same checkpoint quantised by
transformers + bitsandbytes (the codes are the same bytes: test_nf4_ops.py) and
gives pypeft's outputs; and a peft adapter trained over bitsandbytes' NF4
model loads into pypeft's NF4 model with peft's outputs."""

from __future__ import annotations

import pytest
import torch
import transformers

import pypeft
import tiny_models
from nf4_helpers import bnb_config, bnb_reference_path, requires_bnb

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")
pytestmark = requires_bnb


def _llama(tmp_path):
    """A tiny Llama checkpoint whose widths are multiples of 64 (bnb's native CPU
    dequantiser is right there: nf4_helpers), in full precision on disk."""
    config = tiny_models.make("llama").config
    config.intermediate_size = 128
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "fp")
    return tmp_path / "fp"


def _bnb_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config())
    return bnb_reference_path(model).eval()


def _train_a_step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    model.eval()


def test_lora_trained_over_nf4_loads_into_peft_over_bitsandbytes(tmp_path):
    path = _llama(tmp_path)
    ours = pypeft.quantize(transformers.AutoModelForCausalLM.from_pretrained(path).eval())
    pypeft.patch(ours, method="lora", r=4, alpha=8, target_modules="all-linear")
    batch = tiny_models.inputs("llama")
    _train_a_step(ours, batch)  # B moves off zero: the adapter changes the outputs
    pypeft.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_bnb_model(path), tmp_path / "adapter", is_trainable=True).eval()
    # Parameter counts as peft counts them (a 4-bit weight as the weights it holds).
    assert pypeft.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    base = tiny_models.output(_bnb_model(path), batch)
    out_ours, out_theirs = tiny_models.output(ours, batch), tiny_models.output(theirs, batch)
    assert (out_ours - base).abs().max() > 1e-3
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-4, rtol=1e-4)


def test_peft_qlora_adapter_loads_into_pypeft_nf4(tmp_path):
    path = _llama(tmp_path)
    theirs = peft.get_peft_model(_bnb_model(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   init_lora_weights=False))
    batch = tiny_models.inputs("llama")
    theirs.eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = pypeft.quantize(transformers.AutoModelForCausalLM.from_pretrained(path).eval())
    pypeft.load_adapter(ours, tmp_path / "adapter")
    torch.testing.assert_close(tiny_models.output(ours, batch), tiny_models.output(theirs, batch), atol=1e-4,
                               rtol=1e-4)
