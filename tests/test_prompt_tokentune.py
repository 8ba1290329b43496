"""prompt_tuning and p_tuning (MLP and LSTM encoders) composed with TokenTune,
in both patch orders.

References: the prompt method alone (forward values; gradients when every
token is selected), and for the gradients the definition of TokenTune in
plain PyTorch (tests/reference.py: keep_grad_at), on a prompt-tuned copy
without TokenTune: every per-token module returns its outputs at the
unselected REAL tokens as constants, while the virtual tokens (always
selected) and the selected real tokens carry gradient, and every query
attends to every key. The input embedding, which the prompt rewriting calls
on the real tokens only (before the prompts go in front), is made trainable
there so that its gradient checks that unselected real tokens' embeddings
stay constants.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pypeft
import reference as R
import test_tokentune_patch as TT
import tiny_models as tm
from prompt_helpers import VARIANTS, batch_for
from pypeft.layer import TOKENS_ATTR, VIRTUAL_TOKENS_ATTR
from pypeft.methods.prompt.layer import ATTR
from test_prefix_tuning import assert_unpatched_like

FAMILIES = ["llama", "gpt2", "bert"]
ORDERS = ["tokentune first", "prompt first"]
N = 3  # virtual tokens


def with_prompts(model, variant: str = "prompt", adapter_name: str = "default", n: int = N, seed: int = 0):
    method, options = VARIANTS[variant]
    torch.manual_seed(seed)  # the same prompts in the model and its references
    pypeft.patch(model, method=method, num_virtual_tokens=n, adapter_name=adapter_name, **options)
    with torch.no_grad():  # prompts that are not zero / vocabulary rows: gradients reach every part
        for p in getattr(model, ATTR).encoders[adapter_name].parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    return model


def both(model, order: str, variant: str = "prompt", positions=None, k: int = 3, **tokentune):
    if positions is not None:
        tokentune["selector"] = TT.fixed(positions)
    steps = [lambda: pypeft.patch(model, method="tokentune", k=k, **tokentune),
             lambda: with_prompts(model, variant)]
    for step in steps if order == "tokentune first" else steps[::-1]:
        step()
    return model


def trainable_embedding(model):
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def grads(model, batch) -> dict[str, torch.Tensor]:
    return TT._grads(model, model(**batch).loss)


def reference_gradients(model, batch, positions: torch.Tensor, n: int = N) -> dict[str, torch.Tensor]:
    """Gradients with every per-token output at an unselected real token constant:
    [B, n + T] outputs keep gradients at the n prompts and the selected tokens
    (n + positions); the input embedding's [B, T] output at `positions`."""
    B, T = batch["input_ids"].shape
    full = torch.cat((torch.arange(n).expand(B, n), positions + n), 1)

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() >= 3:
            if tuple(out.shape[:2]) == (B, n + T):
                return R.keep_grad_at(out, full)
            if tuple(out.shape[:2]) == (B, T):
                return R.keep_grad_at(out, positions)
        return out

    prompts = getattr(model, ATTR)
    inside = {id(m) for m in prompts.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if TT._per_token(m) and id(m) not in inside]
    try:
        return grads(model, batch)
    finally:
        for h in handles:
            h.remove()


def tolerance(family: str) -> dict:
    # transformers' LlamaRMSNorm normalises in float32 even in float64 (pypeft's op keeps float64).
    return {"rtol": 1e-5, "atol": 1e-7} if family == "llama" else {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_values_equal_the_prompt_method_alone(family, order):
    base = TT.make(family)
    batch = TT.batch_for(family)
    alone = with_prompts(copy.deepcopy(base), "p-mlp")
    model = both(copy.deepcopy(base), order, "p-mlp", k=2)
    with torch.enable_grad():  # training mode with grad: the token selection is active
        got = model(**batch)
    torch.testing.assert_close(got.logits, alone(**batch).logits, **tolerance(family))
    torch.testing.assert_close(got.loss, alone(**batch).loss, **tolerance(family))
    model.eval(), alone.eval()  # no selection: the plain path sees the prompts too
    torch.testing.assert_close(tm.output(model, batch), tm.output(alone, batch), rtol=1e-10, atol=1e-10)
    prompted, plain = tm.output(model, batch), tm.output(base.eval(), batch)
    assert not torch.allclose(prompted[:, -plain.shape[1]:], plain)  # the prompts count (at the real tokens)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_gradients_equal_the_reference(family, order, variant):
    base = TT.make(family)
    batch = TT.batch_for(family)
    positions = TT.positions_for(2)
    model = trainable_embedding(both(copy.deepcopy(base), order, variant, positions, k=2))
    reference = trainable_embedding(with_prompts(copy.deepcopy(base), variant))
    plain = trainable_embedding(with_prompts(copy.deepcopy(base), variant))
    # The prompt encoders compute nothing per token: TokenTune left their classes alone.
    assert [type(m) for m in getattr(model, ATTR).modules()] == [type(m) for m in getattr(plain, ATTR).modules()]
    got = grads(model, batch)
    want = reference_gradients(reference, batch, positions)
    prompt_names = [n for n in got if n.startswith(ATTR + ".")]
    assert prompt_names and all(got[n].abs().sum() > 0 for n in prompt_names)
    TT.assert_same_grads(got, want, float32_norms=family == "llama")
    # ...which are not the prompt method's own gradients (so the comparison can fail).
    ordinary = grads(plain, batch)
    assert any(not torch.allclose(got[n], ordinary[n]) for n in prompt_names)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_selecting_every_token_gives_the_prompt_method_s_own_gradients(family, order):
    base = TT.make(family)
    batch = TT.batch_for(family)
    model = trainable_embedding(both(copy.deepcopy(base), order, "p-lstm", k=TT.T))
    plain = trainable_embedding(with_prompts(copy.deepcopy(base), "p-lstm"))
    TT.assert_same_grads(grads(model, batch), grads(plain, batch))


@pytest.mark.parametrize("order", ORDERS)
def test_a_training_step_changes_the_prompts_only(order):
    model = both(TT.make("llama"), order, "p-mlp", k=2)
    TT.assert_step_trains_only(model, TT.batch_for("llama"), ATTR)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_unpatch_restores_the_model_exactly(family, order, attn):
    base = TT.make(family)
    base.set_attn_implementation(attn)
    batch = TT.batch_for(family)
    model = both(copy.deepcopy(base), order, "p-lstm", k=2)
    model(**batch).loss.backward()
    pypeft.unpatch(model)
    assert_unpatched_like(model, base)
    assert not hasattr(model, ATTR) and VIRTUAL_TOKENS_ATTR not in model.__dict__
    assert torch.equal(tm.output(model, batch), tm.output(base, batch))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_prompt_ensemble_selects_each_row_s_own_slots_and_chosen_tokens(family, order):
    """pypeft.prompt_ensemble (it trains) over adapters of 3 and 2 virtual
    tokens: the second replica has a masked pad slot (GPT-2: in front of its
    prompts; BERT: after its tokens). Every slot and the selector's tokens
    (counted among the row's own tokens) are selected."""
    base = TT.make(family)
    batch = TT.batch_for(family, batch=1)  # replicated: row 0 runs "default", row 1 "two"
    positions = TT.positions_for(2)
    model = both(copy.deepcopy(base), order, "prompt", positions, k=2)
    with_prompts(model, "prompt", adapter_name="two", n=2, seed=1)
    alone = with_prompts(copy.deepcopy(base), "prompt")
    with_prompts(alone, "prompt", adapter_name="two", n=2, seed=1)
    selection = getattr(model.get_input_embeddings(), TOKENS_ATTR)
    seen = []
    first_norm = next(m for m in model.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm")))
    hook = first_norm.register_forward_pre_hook(lambda m, a: seen.append(selection.positions.clone()))
    try:
        with pypeft.prompt_ensemble(model, ["default", "two"]):
            got = model(**batch)
            got.loss.backward()
    finally:
        hook.remove()
    with pypeft.prompt_ensemble(alone, ["default", "two"]):
        want = alone(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-10)
    W, T = N, TT.T
    front = family == "gpt2"
    expected = []
    for row, n in enumerate((3, 2)):
        slots = list(range(W)) if front else list(range(n)) + list(range(n + T, W + T))
        start = W if front else n  # where the row's own tokens begin
        expected.append(sorted(slots + [start + int(p) for p in positions[row]]))
    assert seen and seen[0].tolist() == expected
    prompts = getattr(model, ATTR).encoders
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name in ("default", "two")
               for p in prompts[name].parameters())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", ["gpt2-cls", "llama-cls"])
def test_a_last_token_classifier_s_read_position_is_selected_under_right_padding(family, order):
    """The head reads the sequence's end, where the rewriting puts each row's
    last real token's hidden state (a pad's position in the right-padded first
    row): that position is always selected, beside the prompts and the
    selector's tokens (chosen among the tokens before it), so the row's loss
    reaches the prompts as the definition says."""
    base = TT.make(family)
    batch = tm.labels_for(family, batch_for(family, length=TT.T, padding="right"))
    positions = torch.tensor([[1, 3], [0, 5]])  # the first row's last real token is 3
    model = both(copy.deepcopy(base), order, "prompt", positions, k=2)
    reference = with_prompts(copy.deepcopy(base))
    B, T = batch["input_ids"].shape
    want = reference_gradients(reference, batch, torch.cat((positions, torch.full((B, 1), T - 1)), 1))
    got = grads(model, batch)
    TT.assert_same_grads(got, want, float32_norms=family.startswith("llama"))
    # The right-padded row alone sends the prompts gradient.
    prompts = getattr(model, ATTR).encoders["default"].embedding.weight
    first = torch.nn.functional.cross_entropy(model(**batch).logits[:1], batch["labels"][:1])
    assert torch.autograd.grad(first, prompts)[0].abs().sum() > 0


@pytest.mark.parametrize("order", ORDERS)
def test_loss_on_selected_counts_the_terms_predicted_at_selected_positions(order):
    """GPT-2 with loss_on_selected: a term counts where it is predicted at a
    selected position; the last virtual token (always selected) predicts the
    first real token. Equal to the prompt method alone given the labels with
    every other term set to -100."""
    base = TT.make("gpt2")
    batch = TT.batch_for("gpt2")
    positions = TT.positions_for(2)
    model = both(copy.deepcopy(base), order, "prompt", positions, k=2, loss_on_selected=True)
    alone = with_prompts(copy.deepcopy(base))
    labels = batch["labels"]
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, 0] = True  # predicted at the last virtual token
    counted[:, 1:] = R.token_mask(positions, labels.shape[1])[:, :-1]  # predicted at selected token j - 1
    want = alone(**{**batch, "labels": torch.where(counted, labels, torch.full_like(labels, -100))}).loss
    got = model(**batch).loss
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, alone(**batch).loss)
