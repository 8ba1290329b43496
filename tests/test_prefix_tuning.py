"""Prefix tuning in pypeft: patching, the attention seam, positions, the KV
cache, gradient checkpointing, the lifecycle, composition, mixed batches,
saving and loading, bad input. peft's numbers are checked in
test_prefix_peft_oracle.py; here the references are the unpatched model,
the model running one adapter alone, and plain PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch

import pypeft
import tiny_models as T
from pypeft.methods.prefix.method import ENCODERS_ATTR
from pypeft.methods.prefix.sites import SITE_ATTR
from pypeft.registry import methods

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "opt", "t5"]


def prefix(model, **options):
    return pypeft.patch(model, method="prefix_tuning", **options)


def real(batch: dict, logits: torch.Tensor, family: str) -> torch.Tensor:
    if family in ("bert", "roberta", "distilbert", "t5"):
        return logits
    return logits[batch["attention_mask"].bool()]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def assert_unpatched_like(model, original):
    """unpatch() restored the model exactly: modules, state, flags, attention implementation, hooks."""
    assert model.config._attn_implementation == original.config._attn_implementation
    assert not hasattr(model, ENCODERS_ATTR) and not hasattr(model, "pypeft")
    mine, theirs = model.state_dict(), original.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert all(SITE_ATTR not in m.__dict__ for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in original.parameters()]


# --- config and bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("options, argument", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2.5}, "num_virtual_tokens"),
    ({"encoder_hidden_size": -1}, "encoder_hidden_size"),
    ({"prefix_projection": "yes"}, "prefix_projection"),
    ({"adapter_name": "base"}, "adapter_name"),
])
def test_config_refuses_bad_options(options, argument):
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        pypeft.PrefixTuningConfig(**options)


def test_refuses_non_transformers_models_and_other_attention_implementations():
    with pytest.raises(ValueError, match="argument 'model'"):
        prefix(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = T.make("llama")
    model.config._attn_implementation = "flex_attention"  # what a model loaded with it records
    with pytest.raises(ValueError, match="'flex_attention'.*'sdpa', 'eager'"):
        prefix(model)
    assert not hasattr(model, "pypeft")


# --- patching, shapes, every family reaches the seam ------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_patch_freezes_the_base_and_every_family_changes_and_unpatches_exactly(family):
    model = T.make(family)
    original = copy.deepcopy(model)
    batch = T.inputs(family)
    base = T.output(model, batch)
    prefix(model, num_virtual_tokens=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if not n.startswith(ENCODERS_ATTR)}
    prefix_params = {n for n in trainable if n.startswith(ENCODERS_ATTR)}
    assert prefix_params == {f"{ENCODERS_ATTR}.encoders.default.embedding.weight"}
    assert all(".copies.default." in n for n in heads)  # only a classifier's head copy besides the prefix
    assert bool(heads) == (family in ("bert", "roberta", "distilbert"))
    assert model.config._attn_implementation == "pypeft_prefix_sdpa"
    out = T.output(model, batch)
    assert (out - base).abs().max() > 1e-3  # the prefix reached the attention of this family
    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), base)
    pypeft.unpatch(model)
    assert torch.equal(T.output(model, batch), base)
    assert_unpatched_like(model, original)


@pytest.mark.parametrize("family, kv_heads", [("llama", 2), ("llama_mqa", 1), ("gpt2", 4)])
def test_prefix_has_the_key_value_heads_shape(family, kv_heads):
    model = prefix(T.make(family), num_virtual_tokens=5)
    weight = getattr(model, ENCODERS_ATTR).encoders["default"].embedding.weight
    assert tuple(weight.shape) == (5, 2 * 2 * kv_heads * 16)  # layers * (key, value) * kv heads * head_dim
    projected = prefix(T.make(family), num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=12)
    encoder = getattr(projected, ENCODERS_ATTR).encoders["default"]
    assert tuple(encoder.embedding.weight.shape) == (5, kv_heads * 16)
    assert tuple(encoder.transform[2].weight.shape) == (2 * 2 * kv_heads * 16, 12)


def test_merge_is_refused():
    model = prefix(T.make("llama"))
    with pytest.raises(ValueError, match="cannot be folded"):
        pypeft.merge(model)


# --- the KV cache, positions, generate ------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "t5"])
def test_the_users_cache_holds_real_tokens_only_and_a_cached_step_equals_the_full_forward(family):
    model = prefix(T.make(family), num_virtual_tokens=4)
    batch = T.inputs(family)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    cache = out.cache
    self_cache = getattr(cache, "self_attention_cache", cache)
    length = batch["decoder_input_ids" if family == "t5" else "input_ids"].shape[1]
    assert self_cache.get_seq_length() == length
    assert self_cache.layers[0].keys.shape[-2] == length
    key = "decoder_input_ids" if family == "t5" else "input_ids"
    token = torch.tensor([[5], [9]])
    longer = dict(batch)
    longer[key] = torch.cat([batch[key], token], 1)
    if family != "t5":
        longer["attention_mask"] = torch.ones_like(longer[key])
    with torch.no_grad():
        full = model(**longer).logits[:, -1]
        step = dict(longer)
        step[key] = token
        cached = model(**step, cache=cache).logits[:, -1]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert self_cache.get_seq_length() == length + 1


def test_given_position_ids_are_shifted_past_the_prefix_like_the_default():
    model = prefix(T.make("llama"), num_virtual_tokens=3)
    batch = T.inputs("llama")
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    positions = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        assert torch.equal(model(**batch, position_ids=positions).logits, model(**batch).logits)
        shifted = model(**batch, position_ids=positions + 1).logits
    assert (shifted - model(**batch).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "roberta"])
def test_left_padding_gives_a_row_the_logits_it_has_unpadded(family):
    model = prefix(T.make(family), num_virtual_tokens=3)
    ids = T.inputs(family)["input_ids"][:1]
    padded = torch.cat([torch.full((1, 2), 1 if family == "roberta" else 0), ids], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():  # the last hidden states: a classifier's logits have no positions
        alone = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        left = model(input_ids=padded, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, 2:]
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_cache_equals_generate_without(family, padding):
    """Every generate step (greedy and sampling, batch 2) sees the prefix and
    the same positions whether the cache carries the past or not."""
    model = prefix(T.make(family), num_virtual_tokens=3)
    batch = T.inputs(family)
    if padding == "left":
        batch["attention_mask"] = batch["attention_mask"].flip(-1)
    options = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    greedy = model.generate(**batch, do_sample=False, **options)
    assert torch.equal(model.generate(**batch, do_sample=False, use_cache=False, **options), greedy)
    torch.manual_seed(3)
    sampled = model.generate(**batch, do_sample=True, top_k=0, **options)
    torch.manual_seed(3)
    assert torch.equal(model.generate(**batch, do_sample=True, top_k=0, use_cache=False, **options), sampled)
    with pypeft.disabled(model):
        base = model.generate(**batch, do_sample=False, **options)
    assert not torch.equal(base, greedy)


# --- gradient checkpointing -----------------------------------------------------------------------

@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "t5"])
def test_gradient_checkpointing_gives_the_same_gradients(family, projection, reentrant):
    def grads(checkpointing: bool):
        model = no_dropout(T.make(family))
        torch.manual_seed(0)
        prefix(model, num_virtual_tokens=3, prefix_projection=projection).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()  # what a reentrant checkpoint needs to reach the prefix
        model(**T.labels_for(family, T.inputs(family))).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed)
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# --- the lifecycle --------------------------------------------------------------------------------

def test_named_adapters_switch_disable_delete_and_unpatch():
    model = T.make("llama")
    original = copy.deepcopy(model)
    batch = T.inputs("llama")
    base = T.output(model, batch)
    prefix(model, num_virtual_tokens=3, adapter_name="a")
    out_a = T.output(model, batch)
    prefix(model, num_virtual_tokens=5, prefix_projection=True, adapter_name="b")  # the new adapter is active
    out_b = T.output(model, batch)
    assert (out_a - out_b).abs().max() > 1e-3
    encoders = getattr(model, ENCODERS_ATTR).encoders
    assert all(p.requires_grad for p in encoders["b"].parameters())
    assert not any(p.requires_grad for p in encoders["a"].parameters())
    pypeft.set_adapter(model, "a")
    assert torch.equal(T.output(model, batch), out_a)
    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), base)
    pypeft.set_adapter(model, "b")
    assert torch.equal(T.output(model, batch), out_b)
    pypeft.delete_adapter(model, "b")
    assert "b" not in encoders and model.pypeft.active == "a"
    assert torch.equal(T.output(model, batch), out_a)
    with pytest.raises(ValueError, match="only adapter"):
        pypeft.delete_adapter(model, "a")
    pypeft.unpatch(model)
    assert torch.equal(T.output(model, batch), base)
    assert_unpatched_like(model, original)


def test_deleting_the_last_prefix_adapter_takes_the_seam_out():
    model = T.make("llama")
    batch = T.inputs("llama")
    pypeft.patch(model, method="lora", r=2, adapter_name="lo")
    lora = T.output(model, batch)
    prefix(model, adapter_name="p")
    pypeft.delete_adapter(model, "p")
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, ENCODERS_ATTR)
    assert "prefix_tuning" not in model.pypeft.methods()
    assert all(SITE_ATTR not in m.__dict__ for m in model.modules())
    assert torch.equal(T.output(model, batch), lora)


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_eager_models_delegate_to_eager_and_get_it_back(family):
    sdpa = T.make(family)
    eager = T.make(family)
    eager.set_attn_implementation("eager")
    batch = T.inputs(family)
    for model in (sdpa, eager):
        torch.manual_seed(0)
        prefix(model, num_virtual_tokens=3)
    assert eager.config._attn_implementation == "pypeft_prefix_eager"
    torch.testing.assert_close(T.output(eager, batch), T.output(sdpa, batch), rtol=1e-5, atol=1e-5)
    pypeft.unpatch(eager)
    assert eager.config._attn_implementation == "eager"


# --- composition -----------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["prefix first", "prefix last"])
@pytest.mark.parametrize("other, options", [("lora", {"r": 2}), ("vera", {"r": 8}),
                                            ("bottleneck", {"preset": "pfeiffer"}),
                                            ("bitfit", {"add_missing_biases": True})])
def test_composes_with_adapter_methods(other, options, order):
    """Each adapter computes what it computes alone, whichever is active."""
    base = T.make("llama")
    batch = T.inputs("llama")
    model = copy.deepcopy(base)
    if order == "prefix last":
        pypeft.patch(model, method=other, adapter_name="o", **options)
    torch.manual_seed(0)
    prefix(model, num_virtual_tokens=3, adapter_name="p")
    out_p = T.output(model, batch)
    if order == "prefix first":
        pypeft.patch(model, method=other, adapter_name="o", **options)
    pypeft.set_adapter(model, "o")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    out_o = T.output(model, batch)
    alone = pypeft.patch(copy.deepcopy(base), method=other, adapter_name="o", **options)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in alone.named_parameters():
            p.copy_(params[name])
    torch.testing.assert_close(out_o, T.output(alone, batch), rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    prefix_alone = prefix(copy.deepcopy(base), num_virtual_tokens=3, adapter_name="p")
    pypeft.set_adapter(model, "p")
    assert torch.equal(T.output(model, batch), out_p)
    torch.testing.assert_close(out_p, T.output(prefix_alone, batch), rtol=1e-6, atol=1e-6)
    pypeft.unpatch(model)
    assert torch.equal(T.output(model, batch), T.output(base, batch))


@pytest.mark.parametrize("other, message", [("read", "does not compose with prefix_tuning"),
                                            ("tokentune", "not supported yet")])
def test_refuses_read_and_tokentune_either_way(other, message):
    model = prefix(T.make("bert"))
    with pytest.raises(ValueError, match=message):
        pypeft.patch(model, method=other)
    model = pypeft.patch(T.make("bert"), method=other)
    with pytest.raises(ValueError, match=f"prefix_tuning does not compose with {other}.*{message}"
                       if other == "tokentune" else "does not compose"):
        prefix(model)


def test_refuses_the_other_prompt_learning_methods():
    method = methods()["prefix_tuning"]
    assert not method.composes_with("prompt_tuning") and not method.composes_with("p_tuning")
    assert method.composes_with("lora")
    assert "one prompt-learning method per model" in method.composition_note


# --- mixed batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "t5"])
def test_mixed_batch_rows_equal_running_each_alone(family):
    model = T.make(family)
    prefix(model, num_virtual_tokens=3, adapter_name="a")
    prefix(model, num_virtual_tokens=5, prefix_projection=True, adapter_name="b")
    batch = T.inputs(family, batch=4)
    rows = ["a", "base", "b", "a"]
    want = {}
    for name in ("a", "b"):
        pypeft.set_adapter(model, name)
        want[name] = T.output(model, batch)
    with pypeft.disabled(model):
        want["base"] = T.output(model, batch)
    with pypeft.mixed_batch(model, rows):
        got = T.output(model, batch)
    for i, name in enumerate(rows):
        mask = batch["attention_mask"][i].bool()
        row, expected = got[i], want[name][i]
        if family not in ("bert", "t5"):
            row, expected = row[mask], expected[mask]
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")


# --- saving and loading ---------------------------------------------------------------------------

def test_save_and_load_round_trip_with_projection_and_a_second_adapter(tmp_path):
    base = T.make("bert")
    batch = T.inputs("bert")
    model = prefix(copy.deepcopy(base), num_virtual_tokens=4, prefix_projection=True, adapter_name="x")
    with torch.no_grad():
        model.classifier.copies["x"].weight.add_(1.0)
    out = T.output(model, batch)
    pypeft.save_adapter(model, tmp_path / "x")
    loaded = pypeft.load_adapter(copy.deepcopy(base), tmp_path / "x")
    torch.testing.assert_close(T.output(loaded, batch), out, rtol=1e-5, atol=1e-6)
    # The loaded adapter holds the prefix itself (peft's inference mode): no MLP.
    assert not hasattr(getattr(loaded, ENCODERS_ATTR).encoders["default"], "transform")
    other = prefix(copy.deepcopy(base), num_virtual_tokens=2, adapter_name="first")
    pypeft.load_adapter(other, tmp_path / "x", adapter_name="second")
    assert other.pypeft.active == "first"
    pypeft.set_adapter(other, "second")
    torch.testing.assert_close(T.output(other, batch), out, rtol=1e-5, atol=1e-6)


def test_loading_an_adapter_for_another_model_names_the_field(tmp_path):
    pypeft.save_adapter(prefix(T.make("llama")), tmp_path)
    with pytest.raises(pypeft.AdapterFormatError, match="token_dim=32.*token_dim=64"):
        pypeft.load_adapter(T.make("gpt2"), tmp_path)


# --- DistilBERT, which peft cannot prefix-tune: the semantics in plain PyTorch ---------------------

def test_distilbert_equals_plain_attention_over_prefix_and_shifted_positions():
    """Every layer's self-attention sees block l of the prefix (peft's layout:
    the embedding viewed as (n, layers*2, heads, head_dim), keys at 2l, values
    at 2l+1) before the real keys, and the real tokens sit at positions n.., as
    a cache of length n would put them in BERT."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    n = 3
    base = T.make("distilbert")
    model = prefix(copy.deepcopy(base), num_virtual_tokens=n)
    weight = getattr(model, ENCODERS_ATTR).encoders["default"].embedding.weight.detach()
    layers = weight.view(n, 2 * 2, 4, 16)
    order = {m: i for i, m in enumerate(m for m in base.modules() if type(m).__name__ == "DistilBertSelfAttention")}

    def plain(module, query, key, value, mask, scaling=None, **kwargs):
        block = order[module]
        pk = layers[:, 2 * block].permute(1, 0, 2).expand(key.shape[0], -1, -1, -1)
        pv = layers[:, 2 * block + 1].permute(1, 0, 2).expand(key.shape[0], -1, -1, -1)
        key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if mask is not None:
            mask = torch.cat([torch.ones(*mask.shape[:-1], n, dtype=torch.bool), mask], -1)
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ value).transpose(1, 2), None

    AttentionInterface.register("test_plain_prefix", plain)
    AttentionMaskInterface.register("test_plain_prefix", sdpa_mask)
    base.set_attn_implementation("test_plain_prefix")
    batch = T.inputs("distilbert")
    positions = torch.arange(7)[None].expand(2, 7) + n
    with torch.no_grad():
        want = base(**batch, position_ids=positions).logits
    base.set_attn_implementation("sdpa")
    # The prefix's head copy starts as the base head, so the logits compare directly.
    torch.testing.assert_close(T.output(model, batch), want, rtol=1e-5, atol=1e-5)


def test_a_copy_is_independent_and_unpatches_on_its_own():
    model = prefix(T.make("llama"), num_virtual_tokens=3)
    batch = T.inputs("llama")
    base = T.output(T.make("llama"), batch)
    out = T.output(model, batch)
    twin = copy.deepcopy(model)
    assert torch.equal(T.output(twin, batch), out)
    with torch.no_grad():
        getattr(twin, ENCODERS_ATTR).encoders["default"].embedding.weight.add_(1.0)
    assert torch.equal(T.output(model, batch), out) and not torch.equal(T.output(twin, batch), out)
    pypeft.unpatch(twin)
    assert torch.equal(T.output(twin, batch), base) and torch.equal(T.output(model, batch), out)


def test_a_bfloat16_model_trains_a_float32_prefix_as_peft_does():
    model = prefix(T.make("llama").to(torch.bfloat16), num_virtual_tokens=3).train()
    weight = getattr(model, ENCODERS_ATTR).encoders["default"].embedding.weight
    assert weight.dtype == torch.float32
    out = model(**T.labels_for("llama", T.inputs("llama")))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_changing_the_attention_implementation_after_patching_is_refused_not_silent(family):
    model = prefix(T.make(family))
    batch = T.inputs(family)
    out = T.output(model, batch)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attention implementation is 'eager'.*pypeft_prefix_sdpa"):
        T.output(model, batch)
    with pypeft.disabled(model):
        T.output(model, batch)  # the base model runs
    model.set_attn_implementation("pypeft_prefix_sdpa")
    assert torch.equal(T.output(model, batch), out)
