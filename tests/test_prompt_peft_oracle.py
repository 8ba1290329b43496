"""Prompt tuning and P-tuning against the real `peft` package: adapters made
and trained a step by peft load into pypeft with the same logits (and, for
causal LMs, the same greedy continuation), pypeft's load into peft
(PeftModel.from_pretrained) with the same logits, peft's PromptEncoder
weights give pypeft's encoder the same prompts, and the config fields are
the ones peft writes. Inputs are unpadded, or right-padded where peft is
right (encoders, causal LMs at their real tokens); tests/test_prompt_tuning.py
covers what pypeft does better than peft."""

import json

import pytest
import torch

import pypeft
import tiny_models as T
from prompt_helpers import ALL, CAUSAL, ENCODERS, VARIANTS, batch_for, fresh, peft_config, real_logits, train_step

peft = pytest.importorskip("peft", reason="the `peft` package is the oracle for prompt and P-tuning")

N = 3
EOS, PAD = 0, 0  # the tiny causal LMs' eos_token_id, and the pad generate() is given


def peft_trained(family, variant, tmp_path):
    """A peft model of the variant, trained one step, saved to tmp_path/'peft'."""
    model = peft.get_peft_model(fresh(family), peft_config(peft, T.make(family), variant, N))
    model.train()
    train_step(model, family, batch_for(family))
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    return model


def paddings(family):
    # peft is right on right-padded rows of encoders and causal LMs (at the real tokens); a last-token
    # classifier reads a pad there (peft's bug), so only unpadded rows compare.
    return [None] if family.endswith("-cls") else [None, "right"]


def assert_same_logits(family, ours, theirs, padding):
    batch = batch_for(family, padding=padding)
    got, want = T.output(ours, batch), T.output(theirs, batch)
    if family in CAUSAL and padding is not None:
        for g, w in zip(real_logits(got, batch["attention_mask"], N), real_logits(want, batch["attention_mask"], N)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ALL)
def test_peft_adapter_loads_into_pypeft(tmp_path, family, variant):
    theirs = peft_trained(family, variant, tmp_path)
    ours = pypeft.load_adapter(fresh(family), tmp_path / "peft")
    for padding in paddings(family):
        assert_same_logits(family, ours, theirs, padding)


def greedy_by_full_forwards(model, ids, steps):
    """Greedy decoding by re-running the whole sequence each step (no cache): peft's forward is
    right, while peft 0.21's generate puts the prompts in again on every cached step under
    transformers 5 (it looks for `past_key_values`, which transformers now calls `cache`)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        new = logits[:, -1].argmax(-1).masked_fill(done, PAD)  # generate pads a row after its eos
        done |= new == EOS
        ids = torch.cat((ids, new.unsqueeze(1)), dim=1)
    return ids


@pytest.mark.parametrize("variant", ["prompt", "p-lstm"])
@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generate_equals_peft_s_forward(tmp_path, family, variant):
    theirs = peft_trained(family, variant, tmp_path)
    ours = pypeft.load_adapter(fresh(family), tmp_path / "peft")
    ids = batch_for(family)["input_ids"]
    got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                        pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(got, greedy_by_full_forwards(theirs, ids, 5))


def test_t5_generate_equals_peft_s(tmp_path):
    theirs = peft_trained("t5", "prompt", tmp_path)
    ours = pypeft.load_adapter(fresh("t5"), tmp_path / "peft")
    b = batch_for("t5", padding="right")
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(**kw), theirs.generate(**kw))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["bert", "llama", "llama-cls", "t5", "gpt2"])
def test_pypeft_adapter_loads_into_peft(tmp_path, family, variant):
    method, options = VARIANTS[variant]
    ours = pypeft.patch(fresh(family), method=method, num_virtual_tokens=N, **options)
    ours.train()
    train_step(ours, family, batch_for(family))
    ours.eval()
    pypeft.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path / "ours").eval()
    for padding in paddings(family):
        assert_same_logits(family, ours, theirs, padding)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["llama-cls", "t5", "bert"])
def test_config_fields_are_peft_s(tmp_path, family, variant):
    """Both files hold what peft writes for the same adapter (its bookkeeping aside)."""
    theirs = peft_trained(family, variant, tmp_path)
    ours = pypeft.load_adapter(fresh(family), tmp_path / "peft")
    pypeft.save_adapter(ours, tmp_path / "ours")
    mine, peft_s = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("peft_version", "base_model_name_or_path"):
        peft_s.pop(key, None), mine.pop(key, None)
    if peft_s.get("modules_to_save"):  # peft lists its default heads twice
        peft_s["modules_to_save"] = sorted(set(peft_s["modules_to_save"]))
        mine["modules_to_save"] = sorted(set(mine["modules_to_save"]))
    assert mine == peft_s
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" /
                                                                                 "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["p-mlp", "p-lstm"])
def test_encoder_equals_peft_s_prompt_encoder(variant):
    """peft's PromptEncoder state_dict loads into pypeft's encoder (same names and layout) and gives
    the same prompts; the LSTM runs on recurrent_scan, peft's on torch.nn.LSTM."""
    from peft.tuners.p_tuning.model import PromptEncoder as PeftEncoder
    from pypeft.methods.prompt.encoders import PromptEncoder

    _, options = VARIANTS[variant]
    cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=16,
                                   num_transformer_submodules=2, num_attention_heads=2, num_layers=2,
                                   encoder_reparameterization_type=options["encoder"].upper(),
                                   encoder_hidden_size=options["encoder_hidden_size"],
                                   encoder_num_layers=options.get("encoder_num_layers", 2))
    torch.manual_seed(0)
    theirs = PeftEncoder(cfg)
    ours = PromptEncoder(10, 16, options["encoder"], options["encoder_hidden_size"],
                         options.get("encoder_num_layers", 2), 0.0, torch.float32, "cpu")
    ours.load_state_dict(theirs.state_dict())
    want = theirs(torch.arange(10).unsqueeze(0))[0]
    torch.testing.assert_close(ours(), want, rtol=1e-5, atol=1e-6)
    gw = torch.autograd.grad(want.square().sum(), list(theirs.parameters()))
    go = torch.autograd.grad(ours().square().sum(), list(ours.parameters()))
    for a, b in zip(go, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_encoders_oracle_covers_every_family():
    assert set(ENCODERS) | set(CAUSAL) <= set(ALL)


def test_a_loaded_adapter_joins_a_patched_model_under_its_name(tmp_path):
    theirs = peft_trained("llama", "p-lstm", tmp_path)
    ours = pypeft.patch(fresh("llama"), method="prompt_tuning", num_virtual_tokens=5)
    pypeft.load_adapter(ours, tmp_path / "peft", adapter_name="loaded")
    assert ours.pypeft.active == "default"  # as peft's load_adapter
    pypeft.set_adapter(ours, "loaded")
    assert_same_logits("llama", ours, theirs, "right")


@pytest.mark.parametrize("edit, named", [({"token_dim": 32}, "token_dim"),
                                         ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
                                         ({"some_new_option": 3}, "some_new_option"),
                                         ({"prompt_tuning_init": "WORDS"}, "prompt_tuning_init")])
def test_files_for_another_model_or_unknown_options_are_refused_by_name(tmp_path, edit, named):
    peft_trained("llama", "prompt", tmp_path)
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    model = fresh("llama")
    with pytest.raises(pypeft.AdapterFormatError, match=named):
        pypeft.load_adapter(model, tmp_path / "peft")
    assert pypeft.state_of(model) is None and not hasattr(model, "pypeft_prompts")
