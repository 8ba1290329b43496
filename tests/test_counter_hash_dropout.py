"""pypeft.counter_hash_dropout(model): within it, a patched model in training
mode (its gradients too) equals the same model whose every nn.Dropout and
attention dropout are written out in plain PyTorch with tests/reference.py's
mask (seeds drawn in call order from torch's global RNG); on exit, by any
path, the modules' classes and the attention implementation are restored;
inside a READ model it leaves READ's own swaps in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pypeft
import reference as R
import tiny_models as tm
from test_read_dropout import _reference_attention, _seed, assert_torch_draws


def _with_reference_dropout_everywhere(model):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for m in model.modules():
        if type(m) is nn.Dropout:
            m.forward = (lambda m: lambda x: R.dropout(x, _seed(), m.p) if m.training and m.p > 0 else x)(m)
    AttentionInterface.register("test_counter_hash_reference", _reference_attention)
    AttentionMaskInterface.register("test_counter_hash_reference", sdpa_mask)
    model.set_attn_implementation("test_counter_hash_reference")
    return model


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_training_step_equals_the_reference_dropout(family):
    base = tm.make(family)
    torch.manual_seed(0)  # the same A in both (drawn when patched)
    model = pypeft.patch(copy.deepcopy(base), method="lora", r=4, dropout=0.1)
    torch.manual_seed(0)
    want_model = _with_reference_dropout_everywhere(pypeft.patch(copy.deepcopy(base), method="lora", r=4, dropout=0.1))
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide the adapter's gradient path
        for m in (model, want_model):
            torch.manual_seed(1)
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
    batch = tm.labels_for(family, tm.inputs(family))
    model.train(), want_model.train()
    torch.manual_seed(7)
    want = want_model(**batch).loss
    want.backward()
    with pypeft.counter_hash_dropout(model):
        assert model.config._attn_implementation == "pypeft_counter_hash_sdpa"
        torch.manual_seed(7)
        got = model(**batch).loss
        got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    grads, want_grads = _lora_grads(model), _lora_grads(want_model)
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with pypeft.counter_hash_dropout(model):  # a new seed, new masks
        torch.manual_seed(8)
        assert not torch.allclose(model(**batch).loss, got)


def test_exit_restores_the_classes_and_the_attention_even_on_error():
    model, base = tm.make("bert"), tm.make("bert")
    pypeft.patch(model, method="lora", r=4)
    types = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with pypeft.counter_hash_dropout(model):
            assert type(model.dropout) is not nn.Dropout and type(model.bert.embeddings.dropout) is not nn.Dropout
            raise RuntimeError("boom")
    assert [type(m) for m in model.modules()] == types
    assert model.config._attn_implementation == "sdpa"
    pypeft.unpatch(model)
    assert_torch_draws(model, base)


def test_inside_a_read_model_reads_own_swaps_stay():
    model, base = tm.make("bert"), tm.make("bert")
    pypeft.patch(model, method="read", hidden=8)
    layer_dropout = model.bert.encoder.layer[0].output.dropout
    read_types, read_attention = type(layer_dropout), model.config._attn_implementation
    with pypeft.counter_hash_dropout(model):
        assert type(model.dropout) is not nn.Dropout  # the head, which READ leaves alone
    assert type(layer_dropout) is read_types and type(model.dropout) is nn.Dropout
    assert model.config._attn_implementation == read_attention
    pypeft.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert model.config._attn_implementation == "sdpa"


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="argument model: expected a torch.nn.Module, got dict"):
        with pypeft.counter_hash_dropout({}):
            pass
