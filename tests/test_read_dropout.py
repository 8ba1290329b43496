"""READ's frozen backbone drops out with pypeft's counter-hash mask
(pypeft/counter_hash.py): in training mode the patched model equals
the unpatched one whose stack dropouts and attention dropout are written out
in plain PyTorch with tests/reference.py's mask, seeds drawn in call order
from torch's global RNG; the mask keeps 1 - p of the elements and scales
them by 1 / (1 - p); a seed reproduces a forward; unpatch restores the
modules' classes and the attention implementation. Eval mode and dropout 0
are checked against the plain-PyTorch READ in test_read_patch.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pypeft
import reference as R
import tiny_models as tm
from pypeft.counter_hash import counter_hash_attention
from test_read_patch import STACKS, network_of, randomise_joiner


def _seed() -> int:
    return int(torch.randint(0, 2**62, ()))


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """SDPA's attention with the reference mask on the probabilities; calls
    carrying a position bias (T5) stay SDPA's, as READ leaves them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = R.attention(query, key, value, attention_mask, causal, scale, dropout, _seed())
    return out.transpose(1, 2).contiguous(), None


def with_reference_dropout(model, family):
    """The unpatched model, its stacks' nn.Dropout and its attention dropout
    written out with the reference mask (instance forwards, a registered
    attention function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    stacks = [model.get_submodule(STACKS[family][0])]
    if family == "t5":
        stacks.append(model.encoder)  # READ runs T5's encoder under no_grad too
    for stack in stacks:
        for m in stack.modules():
            if type(m) is nn.Dropout:
                m.forward = (lambda m: lambda x: R.dropout(x, _seed(), m.p) if m.training and m.p > 0 else x)(m)
    AttentionInterface.register("test_read_reference", _reference_attention)
    AttentionMaskInterface.register("test_read_reference", sdpa_mask)
    model.set_attn_implementation("test_read_reference")
    return model


@pytest.mark.parametrize("family", list(STACKS))
def test_train_mode_equals_the_reference_dropout(family):
    model, batch = tm.make(family), tm.inputs(family)
    pypeft.patch(model, method="read", hidden=8)
    base = with_reference_dropout(tm.make(family), family)
    model.train(), base.train()
    torch.manual_seed(7)
    want = base(**batch).logits
    torch.manual_seed(7)
    got = model(**batch).logits  # the joiner starts at zero: READ adds nothing yet
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    if family != "llama":  # tiny Llama has no dropout
        torch.manual_seed(8)
        assert not torch.allclose(model(**batch).logits, got)  # a new seed, new masks


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_a_seed_reproduces_a_training_forward(family):
    model, batch = tm.make(family), tm.labels_for(family, tm.inputs(family))
    pypeft.patch(model, method="read", hidden=8)
    randomise_joiner(network_of(model, family))
    model.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        loss = model(**batch).loss
        loss.backward()
        runs.append((loss.detach(), network_of(model, family).weight_ih.grad.clone()))
        model.zero_grad()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_hidden_dropout_keeps_one_minus_p_scaled():
    model = tm.make("bert")
    pypeft.patch(model, method="read", hidden=8)
    model.train()
    drop = model.bert.encoder.layer[0].output.dropout
    drop.p = 0.25
    torch.manual_seed(0)
    y = drop(torch.ones(512, 512))
    kept = y != 0
    # 262,144 draws: the kept share's standard deviation is 0.00085.
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75), rtol=1e-6, atol=0)
    assert abs(y.mean().item() - 1.0) < 0.01
    drop.eval()
    x = torch.randn(4, 8)
    assert drop(x) is x or torch.equal(drop(x), x)


def test_attention_dropout_keeps_one_minus_p_scaled():
    # Zero queries make every probability 1 / S; an identity value matrix
    # returns the dropped probabilities themselves.
    B, H, S, p = 4, 4, 128, 0.2
    q, k = torch.zeros(B, H, S, 16), torch.randn(B, H, S, 16)
    v = torch.eye(S).expand(B, H, S, S)
    torch.manual_seed(0)
    out = counter_hash_attention(q, k, v, None, p, 0.25, False)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (S * (1 - p))), rtol=1e-5, atol=0)
    # Each row's mass is the share kept over 1 - p, about 1 on average.
    assert abs(out.sum(-1).mean().item() - 1.0) < 0.01


def test_attention_masks_and_groups_match_the_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 5,
                                                                                                      generator=g)
    keys = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keys[0, ..., -2:] = False
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~keys, torch.finfo(torch.float32).min)
    for mask, causal in ((None, False), (None, True), (keys, False), (additive, False)):
        torch.manual_seed(4)
        got = counter_hash_attention(q, k, v, mask, 0.3, 0.35, causal)
        torch.manual_seed(4)
        want = R.attention(q, k, v, keys if mask is additive else mask, causal, 0.35, 0.3, _seed())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def assert_torch_draws(model, base):
    """In training mode `model` gives the untouched `base`'s output bit for bit: torch's draws again."""
    model.train(), base.train()
    torch.manual_seed(5)
    got = model(**tm.inputs("bert")).logits
    torch.manual_seed(5)
    torch.testing.assert_close(got, base(**tm.inputs("bert")).logits, rtol=0, atol=0)


def test_unpatch_restores_the_dropouts_and_the_attention_implementation():
    model, base = tm.make("bert"), tm.make("bert")
    pypeft.patch(model, method="read", hidden=8)
    assert model.config._attn_implementation != "sdpa"
    assert type(model.dropout) is nn.Dropout  # the head keeps torch's dropout
    assert type(model.bert.embeddings.dropout) is nn.Dropout  # outside the stack
    pypeft.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert_torch_draws(model, base)


def test_an_eager_model_keeps_its_attention():
    model = tm.make("bert")
    model.set_attn_implementation("eager")
    base = tm.make("bert")
    base.set_attn_implementation("eager")
    pypeft.patch(model, method="read", hidden=8)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(tm.output(model, tm.inputs("bert")), tm.output(base, tm.inputs("bert")), rtol=0, atol=0)
    pypeft.unpatch(model)
    assert model.config._attn_implementation == "eager"
