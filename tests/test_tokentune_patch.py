"""pypeft.patch(method="tokentune") on tiny BERT, RoBERTa, GPT-2 and Llama.

The gradient reference is the definition of TokenTune written in plain
PyTorch (tests/reference.py: keep_grad_at): an unpatched copy of the model in
float64 whose every per-token module (linear layers, norms, embeddings)
returns its unselected tokens' outputs detached, i.e. as constants, while
attention still sees every key and value.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pypeft
import reference as R
import saved_tensors
import tiny_models as tm
from pypeft.methods.adapted_linear import AdaptedLinear
from pypeft.models.linear import is_linear_like

FAMILIES = ["bert", "roberta", "gpt2", "llama"]
T = 7


def make(family: str) -> nn.Module:
    model = tm.make(family).double().train()
    for m in model.modules():  # dropout draws differ from torch's: compare without it
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def batch_for(family: str, batch: int = 2) -> dict:
    return tm.labels_for(family, tm.inputs(family, batch=batch, length=T))


def fixed(positions: torch.Tensor):
    """A selector returning these positions (a callable decides alone)."""
    return lambda input_ids, attention_mask, k: positions[:, :k].clone()


def positions_for(k: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(batch)])


def _per_token(module: nn.Module) -> bool:
    return (is_linear_like(module) or isinstance(module, (nn.LayerNorm, nn.Embedding, AdaptedLinear))
            or type(module).__name__.endswith("RMSNorm"))


def reference_gradients(model: nn.Module, batch: dict, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the loss with every unselected token's per-token outputs constant."""
    B, length = batch["input_ids"].shape

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() >= 3 and tuple(out.shape[:2]) == (B, length):
            return R.keep_grad_at(out, positions)
        return out

    handles = [m.register_forward_hook(hook) for m in model.modules() if _per_token(m)]
    try:
        loss = model(**batch).loss
    finally:
        for h in handles:
            h.remove()
    return _grads(model, loss)


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}


def assert_same_grads(got: dict, want: dict, float32_norms: bool = False) -> None:
    """float32_norms: transformers' LlamaRMSNorm normalises in float32 even in a
    float64 model (pypeft's op keeps float64), so the reference is only
    float32-accurate there."""
    assert got.keys() == want.keys()
    atol, rtol = (1e-7, 1e-5) if float32_norms else (1e-10, 1e-8)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_step_trains_only(model: nn.Module, batch: dict, owner: str) -> None:
    """One SGD step on the trainable parameters, which must be exactly those
    of the submodule `owner` (a soft-prompt method's parameters beside
    TokenTune), changes them and nothing else."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p is q for p, q in zip(trained, model.get_submodule(owner).parameters()))
    optimizer = torch.optim.SGD(trained, lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(owner + ".") for n in changed)


def with_lora(model: nn.Module) -> nn.Module:
    pypeft.patch(model, method="lora", r=4, alpha=8, target_modules="all-linear")
    # Non-zero B, so that gradients reach A and the layers below.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedLinear):
                for p in m.lora_B.values():
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 3, T])
@pytest.mark.parametrize("compose", ["alone", "lora"])
def test_gradients_equal_reference(family, k, compose):
    model = make(family)
    if compose == "lora":
        with_lora(model)
    reference = copy.deepcopy(model)
    batch = batch_for(family)
    positions = positions_for(k)
    pypeft.patch(model, method="tokentune", k=k, selector=fixed(positions))
    got = _grads(model, model(**batch).loss)
    want = reference_gradients(reference, batch, positions)
    if compose == "alone":
        assert len(got) == len(list(model.parameters()))  # TokenTune alone trains every weight
    else:
        assert all("lora_" in n or "classifier" in n or "score" in n for n in got)
    assert_same_grads(got, want, float32_norms=family == "llama")


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_likes(family):
    model = make(family)
    with_lora(model)
    reference = copy.deepcopy(model)
    batch = batch_for(family)
    positions = positions_for(3)
    pypeft.patch(model, method="tokentune", k=3, selector=fixed(positions))
    assert_same_grads(_grads(model, model(**batch).loss), reference_gradients(reference, batch, positions),
                      float32_norms=True)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_k_equal_to_length_is_ordinary_fine_tuning(family):
    model = make(family)
    plain = copy.deepcopy(model)
    batch = batch_for(family)
    pypeft.patch(model, method="tokentune", k=T)
    assert_same_grads(_grads(model, model(**batch).loss), _grads(plain, plain(**batch).loss),
                      float32_norms=family == "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_values_equal_the_unpatched_model(family):
    model = tm.make(family).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    plain = copy.deepcopy(model)
    batch = batch_for(family)
    pypeft.patch(model, method="tokentune", k=3)
    out = model(**batch)
    torch.testing.assert_close(out.logits, plain(**batch).logits, atol=1e-5, rtol=1e-5)
    assert out.loss.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_no_grad_change_nothing(family):
    model = tm.make(family)
    plain = copy.deepcopy(model)
    batch = tm.inputs(family)
    pypeft.patch(model, method="tokentune", k=2)
    calls = []
    selection = model.pypeft.method_states["tokentune"].selection
    orig = selection.choose
    selection.choose = lambda *a: calls.append(1) or orig(*a)
    model.eval()
    torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=0, rtol=0)
    model.train()
    plain.train()
    for m in list(model.modules()) + list(plain.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=0, rtol=0)
    assert calls == []


def test_vera_composes():
    model = make("llama")
    pypeft.patch(model, method="vera", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedLinear):
                for p in m.vera_lambda_b.values():
                    p.normal_(0, 0.5)
    reference = copy.deepcopy(model)
    batch = batch_for("llama")
    positions = positions_for(3)
    pypeft.patch(model, method="tokentune", k=3, selector=fixed(positions))
    assert_same_grads(_grads(model, model(**batch).loss), reference_gradients(reference, batch, positions),
                      float32_norms=True)


def test_lora_patched_after_tokentune_gives_the_same_gradients():
    positions = positions_for(3)
    batch = batch_for("gpt2")
    first = make("gpt2")
    torch.manual_seed(5)
    with_lora(first)
    second = copy.deepcopy(first)
    pypeft.unpatch(second)
    pypeft.patch(first, method="tokentune", k=3, selector=fixed(positions))
    pypeft.patch(second, method="tokentune", k=3, selector=fixed(positions))
    torch.manual_seed(5)
    with_lora(second)
    assert not any(p.requires_grad for n, p in second.named_parameters() if "lora_" not in n)
    assert_same_grads(_grads(second, second(**batch).loss), _grads(first, first(**batch).loss))


def test_padding_tokens_send_no_gradient():
    """A selected padding token is masked as a key for every query, so which
    padding fills a short row's selection changes no gradient."""
    model = make("bert")
    batch = batch_for("bert")  # row 0 ends in two padding tokens (5, 6)
    grads = []
    for pad in (5, 6):
        positions = positions_for(4)
        positions[0] = torch.tensor([0, 2, 3, pad])
        m = copy.deepcopy(model)
        pypeft.patch(m, method="tokentune", k=4, selector=fixed(positions))
        grads.append(_grads(m, m(**batch).loss))
    assert_same_grads(grads[0], grads[1])


# --- selection ------------------------------------------------------------------------

def _chosen(model, batch) -> torch.Tensor:
    seen = []
    selection = model.pypeft.method_states["tokentune"].selection
    orig = selection.choose
    selection.choose = lambda *a: seen.append(orig(*a)) or seen[-1]
    model(**batch)
    selection.choose = orig
    return seen[-1]


@pytest.mark.parametrize("family, keep", [("bert", [0]), ("llama", [0, -1])])
def test_random_selection_keeps_the_first_token_and_the_last_for_decoders(family, keep):
    model = make(family)
    batch = tm.labels_for(family, tm.inputs(family, batch=4, length=12))
    if family == "bert":
        batch["labels"] = torch.tensor([0, 2, 1, 0])
    mask = batch["attention_mask"].bool()
    pypeft.patch(model, method="tokentune", k=4, seed=3)
    for _ in range(5):
        positions = _chosen(model, batch)
        assert positions.shape == (4, 4)
        for row, p in zip(mask, positions):
            valid = row.nonzero().flatten()
            assert len(set(p.tolist())) == 4 and all(row[p].tolist())
            for i in keep:
                assert valid[i].item() in p.tolist()


def test_random_selection_is_uniform_and_seeded():
    model = make("bert")
    batch = tm.labels_for("bert", tm.inputs("bert", batch=2, length=12))
    pypeft.patch(model, method="tokentune", k=3, seed=7)
    counts = torch.zeros(12)
    draws = [_chosen(model, batch) for _ in range(300)]
    for d in draws:
        counts.index_add_(0, d[1], torch.ones(3))  # row 1: no padding
    assert counts[0] == 300  # always kept
    others = counts[1:] / 300
    assert torch.allclose(others, torch.full_like(others, 2 / 11), atol=0.06)
    again = make("bert")
    pypeft.patch(again, method="tokentune", k=3, seed=7)
    assert torch.equal(_chosen(again, batch), draws[0])


def test_short_sequences_fill_with_padding_and_k_is_clamped():
    model = make("bert")
    batch = tm.labels_for("bert", tm.inputs("bert", batch=2, length=4))
    batch["attention_mask"][0] = torch.tensor([1, 1, 0, 0])
    pypeft.patch(model, method="tokentune", k=100)  # clamped to T = 4
    positions = _chosen(model, batch)
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    pypeft.unpatch(model)
    pypeft.patch(model, method="tokentune", k=3)
    positions = _chosen(model, batch)
    assert positions[0, :2].tolist() == [0, 1]  # both real tokens, then one padding filler


def test_fraction():
    model = make("bert")
    batch = tm.labels_for("bert", tm.inputs("bert", batch=2, length=10))
    pypeft.patch(model, method="tokentune", fraction=0.25)
    assert _chosen(model, batch).shape == (2, math.ceil(0.25 * 10))


def test_loss_on_selected_counts_only_selected_positions():
    model = make("gpt2")
    batch = batch_for("gpt2")
    positions = positions_for(3)
    plain = copy.deepcopy(model)
    pypeft.patch(model, method="tokentune", k=3, selector=fixed(positions), loss_on_selected=True)
    loss = model(**batch).loss
    logits = plain(**batch).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    selected = R.token_mask(positions, T)[:, :-1]
    want = nn.functional.cross_entropy(logits[selected], targets[selected])
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-6)  # transformers' loss runs in float32


# --- lifecycle ------------------------------------------------------------------------

def test_unpatch_restores_the_model():
    model = make("llama")
    plain = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    pypeft.patch(model, method="tokentune", k=2)
    assert list(model.state_dict()) == keys  # a fully fine-tuned model saves as before
    assert model.config._attn_implementation == "pypeft_token_subset"
    pypeft.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert model.config._attn_implementation == plain.config._attn_implementation
    assert not model._forward_pre_hooks and not model._forward_hooks
    batch = batch_for("llama")
    torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=0, rtol=0)


def test_unpatch_after_lora_and_tokentune():
    model = make("bert")
    plain = copy.deepcopy(model)
    with_lora(model)
    pypeft.patch(model, method="tokentune", k=2)
    pypeft.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options, match", [
    (dict(k=0), "argument 'k'"),
    (dict(k=-3), "argument 'k'"),
    (dict(k=2.5), "argument 'k'"),
    (dict(fraction=0.0), "argument 'fraction'"),
    (dict(fraction=1.5), "argument 'fraction'"),
    (dict(k=3, fraction=0.5), "one of 'k' and 'fraction'"),
    (dict(keep="last"), "argument 'keep'"),
    (dict(selector="best"), "argument 'selector'"),
    (dict(adapter_name="x"), "adapter_name"),
    (dict(r=4), "unknown option 'r'"),
])
def test_bad_options(options, match):
    model = make("bert")
    with pytest.raises(ValueError, match=match):
        pypeft.patch(model, method="tokentune", **options)
    assert not hasattr(model, "pypeft") or "tokentune" not in model.pypeft.method_states


@pytest.mark.parametrize("returned, match", [
    (lambda ids: torch.tensor([[0, 9], [1, 2]]), r"positions in \[0, 7\)"),
    (lambda ids: torch.tensor([[1, 1], [1, 2]]), "distinct"),
    (lambda ids: torch.tensor([[1, 2, 3], [1, 2, 4]]), r"shape \[2, 2\]"),
    (lambda ids: torch.tensor([[1.0, 2.0], [1.0, 2.0]]), "int64"),
])
def test_bad_selector_output(returned, match):
    model = make("bert")
    pypeft.patch(model, method="tokentune", k=2, selector=lambda ids, mask, k: returned(ids))
    with pytest.raises(ValueError, match=match) as info:
        model(**batch_for("bert"))
    assert "selector" in str(info.value)


def test_patching_twice_raises():
    model = make("bert")
    pypeft.patch(model, method="tokentune", k=2)
    with pytest.raises(ValueError, match="TokenTune already"):
        pypeft.patch(model, method="tokentune", k=3)


# --- memory -------------------------------------------------------------------------

def saved_bytes(model, batch) -> int:
    with saved_tensors.saved(exclude=model.parameters()) as record:
        model(**batch).loss
    return record.nbytes


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_saved_activations_scale_with_k(family):
    model = tm.make(family).train()
    batch = tm.labels_for(family, tm.inputs(family, batch=2, length=48))
    full = saved_bytes(model, batch)
    pypeft.patch(model, method="tokentune", k=4)
    few = saved_bytes(model, batch)
    # What is left is mostly keys and values of every token (2 of ~10 per-layer tensors).
    assert few < 0.45 * full, (few, full)


def test_the_pooler_keeps_its_rows_not_the_whole_hidden_state():
    """BERT's pooler reads hidden[:, 0], a view of every token's final hidden
    state; saved as it is, it would keep all of that alive for backward."""
    model = tm.make("bert").train()
    pypeft.patch(model, method="tokentune", k=2)
    batch = tm.labels_for("bert", tm.inputs("bert", batch=2, length=16))
    with saved_tensors.saved(exclude=model.parameters()) as record:
        handles = [model.bert.pooler.register_forward_pre_hook(lambda m, a: record.tensors.clear()),
                   model.bert.pooler.register_forward_hook(lambda m, a, out: record.tensors.append(None))]
        try:
            model(**batch).loss
        finally:
            for h in handles:
                h.remove()
    inside = record.tensors[:record.tensors.index(None)]  # what the pooler saved
    assert inside, "the pooler saved nothing"
    for t in inside:
        assert t.untyped_storage().nbytes() <= t.numel() * t.element_size(), (tuple(t.shape), t.untyped_storage().nbytes())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_model_with_a_seeded_random_selection_gives_the_same_gradients(family):
    """The random selector (a seeded generator) under torch.compile: its draw
    once broke the graph inside the hook, the traced layers saw no selection
    and ran in full (gradients of every token, no error)."""
    grads = []
    for compiled in (False, True):
        model = make(family)
        with_lora(model)
        pypeft.patch(model, method="tokentune", k=3, seed=5)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        grads.append(_grads(model, run(**batch_for(family)).loss))
    assert_same_grads(grads[1], grads[0])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_model_gives_the_same_gradients(family):
    model = make(family)
    with_lora(model)
    batch = batch_for(family)
    positions = positions_for(3)
    pypeft.patch(model, method="tokentune", k=3, selector=fixed(positions))
    eager = _grads(model, model(**batch).loss)
    compiled = torch.compile(model, backend="aot_eager")
    assert_same_grads(_grads(model, compiled(**batch).loss), eager)
