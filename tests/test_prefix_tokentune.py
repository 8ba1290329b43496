"""prefix_tuning composed with TokenTune, in both patch orders.

References: prefix tuning alone (forward values; gradients when every token
is selected), and for the prefix's gradients the definition of TokenTune
written in plain PyTorch (test_tokentune_patch.reference_gradients): a
prefix-tuned copy of the model, without TokenTune, whose every per-token
module returns its unselected tokens' outputs as constants while every
query still attends to every key, prefix keys included. The prefix slots
are no tokens of the sequence: no hook touches them, so their parameters
get gradient through the selected queries only.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pypeft
import test_tokentune_patch as TT
import tiny_models as tm
from pypeft.methods.prefix.method import ENCODERS_ATTR
from pypeft.methods.tokentune.attention import IMPLEMENTATION as TOKEN_SUBSET
from test_prefix_tuning import assert_unpatched_like

FAMILIES = ["llama", "gpt2", "bert"]
ORDERS = ["tokentune first", "prefix first"]
N = 3  # virtual tokens


def with_prefix(model, seed: int = 0, adapter_name: str = "p", **options):
    torch.manual_seed(seed)  # the same prefix in the model and its references
    return pypeft.patch(model, method="prefix_tuning", num_virtual_tokens=N, adapter_name=adapter_name, **options)


def both(model, order: str, positions=None, k: int = 3, **prefix_options):
    selector = TT.fixed(positions) if positions is not None else None
    tokentune = {"k": k, **({"selector": selector} if selector is not None else {})}
    if order == "tokentune first":
        pypeft.patch(model, method="tokentune", **tokentune)
        with_prefix(model, **prefix_options)
    else:
        with_prefix(model, **prefix_options)
        pypeft.patch(model, method="tokentune", **tokentune)
    return model


def prefix_grads(model, batch) -> dict[str, torch.Tensor]:
    return TT._grads(model, model(**batch).loss)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_prefix_wraps_token_subset_attention_and_forward_values_equal_prefix_alone(family, order):
    base = TT.make(family)
    batch = TT.batch_for(family)
    alone = with_prefix(copy.deepcopy(base))
    model = both(copy.deepcopy(base), order, k=2)
    assert model.config._attn_implementation == f"pypeft_prefix_{TOKEN_SUBSET}"
    # transformers' LlamaRMSNorm normalises in float32 even in float64 (pypeft's op keeps float64).
    tol = {"rtol": 1e-5, "atol": 1e-7} if family == "llama" else {"rtol": 1e-10, "atol": 1e-10}
    with torch.enable_grad():  # training mode with grad: the token selection is active
        got = model(**batch).logits
    torch.testing.assert_close(got, alone(**batch).logits, **tol)
    # The fallback paths (eval, no_grad: no selection) see the prefix too.
    torch.testing.assert_close(tm.output(model, batch), tm.output(alone, batch), rtol=1e-10, atol=1e-10)
    model.eval(), alone.eval()
    torch.testing.assert_close(tm.output(model, batch), tm.output(alone, batch), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(tm.output(model, batch), tm.output(base.eval(), batch))  # the prefix counts


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_gradients_flow_through_the_selected_queries_only(family, order, projection):
    base = TT.make(family)
    batch = TT.batch_for(family)
    positions = TT.positions_for(2)
    options = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    model = both(copy.deepcopy(base), order, positions, k=2, **options)
    reference = with_prefix(copy.deepcopy(base), **options)
    plain = with_prefix(copy.deepcopy(base), **options)
    # The prefix's encoder is no per-token module: TokenTune left its classes alone.
    assert [type(m) for m in getattr(model, ENCODERS_ATTR).modules()] == \
        [type(m) for m in getattr(plain, ENCODERS_ATTR).modules()]
    got = prefix_grads(model, batch)
    want = TT.reference_gradients(reference, batch, positions)
    assert any(name.startswith(ENCODERS_ATTR + ".") for name in got)
    TT.assert_same_grads(got, want, float32_norms=family == "llama")
    # ...which are not ordinary prefix-tuning gradients (so the comparison can fail).
    ordinary = prefix_grads(plain, batch)
    assert any(not torch.allclose(got[n], ordinary[n]) for n in got if n.startswith(ENCODERS_ATTR + "."))


@pytest.mark.parametrize("order", ORDERS)
def test_selecting_every_token_gives_prefix_tunings_own_gradients(order):
    base = TT.make("gpt2")
    batch = TT.batch_for("gpt2")
    model = both(copy.deepcopy(base), order, k=TT.T)
    plain = with_prefix(copy.deepcopy(base))
    TT.assert_same_grads(prefix_grads(model, batch), prefix_grads(plain, batch))


@pytest.mark.parametrize("order", ORDERS)
def test_a_training_step_changes_the_prefix_only(order):
    model = both(TT.make("llama"), order, k=2)
    TT.assert_step_trains_only(model, TT.batch_for("llama"), ENCODERS_ATTR)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_unpatch_restores_the_model_exactly(family, order, attn):
    base = TT.make(family)
    base.set_attn_implementation(attn)
    batch = TT.batch_for(family)
    model = both(copy.deepcopy(base), order, k=2, prefix_projection=True)
    model(**batch).loss.backward()
    pypeft.unpatch(model)
    assert_unpatched_like(model, base)
    assert torch.equal(tm.output(model, batch), tm.output(base, batch))


@pytest.mark.parametrize("order", ORDERS)
def test_set_adapter_disabled_and_deleting_the_last_prefix_leave_tokentune_working(order):
    """With a LoRA adapter beside the prefix: switching, disabling, and
    deleting the prefix keep TokenTune's attention; unpatch still restores sdpa."""
    base = TT.make("llama")
    batch = TT.batch_for("llama")
    positions = TT.positions_for(2)
    lora_alone = TT.with_lora(copy.deepcopy(base))
    model = copy.deepcopy(lora_alone)
    both(model, order, positions, k=2)
    # Only TokenTune and LoRA: gradients of LoRA as TokenTune gives them alone.
    tokentune_lora = pypeft.patch(copy.deepcopy(lora_alone), method="tokentune", k=2,
                                  selector=TT.fixed(positions))
    pypeft.set_adapter(model, "default")  # the LoRA adapter
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora_names and not any(n.startswith(ENCODERS_ATTR) for n in lora_names)
    torch.testing.assert_close(tm.output(model, batch), tm.output(lora_alone, batch), rtol=1e-10, atol=1e-10)
    TT.assert_same_grads(prefix_grads(model, batch), prefix_grads(tokentune_lora, batch), float32_norms=True)
    with pypeft.disabled(model):
        torch.testing.assert_close(tm.output(model, batch), tm.output(base, batch), rtol=1e-10, atol=1e-10)
    pypeft.delete_adapter(model, "p")
    assert model.config._attn_implementation == TOKEN_SUBSET and not hasattr(model, ENCODERS_ATTR)
    TT.assert_same_grads(prefix_grads(model, batch), prefix_grads(tokentune_lora, batch), float32_norms=True)
    pypeft.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(tm.output(model, batch), tm.output(base, batch))


def test_patching_the_prefix_again_after_deleting_it_wraps_tokentune_again():
    model = TT.with_lora(TT.make("gpt2"))
    both(model, "prefix first", k=2)
    pypeft.delete_adapter(model, "p")
    with_prefix(model, adapter_name="again")
    assert model.config._attn_implementation == f"pypeft_prefix_{TOKEN_SUBSET}"
    pypeft.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
