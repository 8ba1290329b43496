"""Prefix tuning against the real `peft` package (0.21), both ways, per family.

peft → pypeft: an adapter made with peft and trained one step, saved, loaded
with pypeft.load_adapter gives peft's logits (real-token positions: pad
positions carry no meaning and their positions are set differently, see
below); causal LMs and T5 give the greedy decode of peft's forward.
pypeft → peft: an adapter trained a step with pypeft, saved, loaded with
PeftModel.from_pretrained gives pypeft's logits.

What the installed peft does, and how the reference is taken:
- Causal LMs and T5: peft's own forward (PeftModel.__call__).
- Sequence classifiers: peft 0.21.2 refuses prefix tuning on transformers 5.24
  ("Model does not support past key values": it looks for a `past_key_values`
  parameter, which transformers renamed `cache`). The reference runs peft's
  own prefix (PeftModel.get_prompt, a DynamicCache of length n) through the
  base model as its _prefix_tuning_forward does: attention mask with n ones in
  front, the prefix as the cache.
- generate: peft 0.21.2's generate on transformers 5.24 does not decode with
  the prefix (it injects it as past_key_values while generate passes its own
  cache as `cache`; Llama's and T5's greedy outputs equal the base model's,
  GPT-2's and OPT's neither that nor peft's forward decoding). The reference
  for generate is a greedy loop over peft's forward, with position_ids from
  the attention mask as generate makes them (peft adds n to them).
- T5: peft prefixes the decoder's self-attention only (not the encoder, not
  cross-attention), decoder layer j reading block (2j mod num_layers) of the
  prompt; pypeft matches it (pypeft/methods/prefix/sites.py).
- Positions of pad tokens: peft's forward gives arange(L) + n (also to left
  padding); pypeft gives cumsum(mask) - 1 + n, the positions generate uses.
  The two agree on every real token of right-padded inputs, which the
  forward checks use.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pypeft
import tiny_models as T

peft = pytest.importorskip("peft")

N = 3
TASK = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "llama_seq_cls": "SEQ_CLS", "gpt2_seq_cls": "SEQ_CLS",
        "t5": "SEQ_2_SEQ_LM"}
FAMILIES = ["bert", "roberta", "gpt2", "llama", "llama_mqa", "mistral", "qwen2", "opt", "t5", "llama_seq_cls",
            "gpt2_seq_cls"]
CAUSAL = ["gpt2", "llama", "llama_mqa", "qwen2", "opt"]


def task(family: str) -> str:
    return TASK.get(family, "CAUSAL_LM")


def batch_for(family: str) -> dict:
    batch = T.inputs(family)
    if family.endswith("_seq_cls"):  # decoder classifiers pool the last token that is not the pad id
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    return batch


def peft_logits(pm, batch: dict) -> torch.Tensor:
    if task_of(pm) != "SEQ_CLS":
        return pm(**batch).logits
    rows = batch["input_ids"].shape[0]
    kwargs = dict(batch)
    kwargs["attention_mask"] = torch.cat([torch.ones(rows, N, dtype=batch["attention_mask"].dtype),
                                          batch["attention_mask"]], dim=1)
    return pm.base_model(**kwargs, cache=pm.get_prompt(rows)).logits


def task_of(pm) -> str:
    return pm.active_peft_config.task_type


def real(family: str, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """The logits of real tokens (all of a classifier's, all of T5's decoder)."""
    if task(family) in ("SEQ_CLS", "SEQ_2_SEQ_LM"):
        return logits
    return logits[batch["attention_mask"].bool()]


def step(model, loss_fn, lr: float = 0.5) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn()
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)
            p.grad = None


def peft_model(base, family: str, projection: bool):
    config = peft.PrefixTuningConfig(task_type=task(family), num_virtual_tokens=N, prefix_projection=projection,
                                     encoder_hidden_size=24 if projection else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), config)


def trained_with_peft(family: str, projection: bool):
    base = T.make(family)
    pm = peft_model(base, family, projection).train()
    batch = T.labels_for(family, batch_for(family))
    if task(family) == "SEQ_CLS":
        labels = batch.pop("labels")
        step(pm, lambda: torch.nn.functional.cross_entropy(peft_logits(pm, batch), labels))
    else:
        step(pm, lambda: pm(**batch).loss)
    return base, pm.eval()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_into_pypeft_with_peft_logits(family, projection, tmp_path):
    base, pm = trained_with_peft(family, projection)
    batch = batch_for(family)
    with torch.no_grad():
        want = peft_logits(pm, batch)
    pm.save_pretrained(tmp_path)
    model = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    got = T.output(model, batch)
    torch.testing.assert_close(real(family, batch, got), real(family, batch, want), rtol=1e-5, atol=1e-5)
    # The prefix matters: the base model's logits are far from these.
    assert (real(family, batch, T.output(base, batch)) - real(family, batch, want)).abs().max() > 1e-2


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pypeft_adapter_loads_into_peft_with_pypeft_logits(family, projection, tmp_path):
    base = T.make(family)
    model = pypeft.patch(copy.deepcopy(base), method="prefix_tuning", num_virtual_tokens=N,
                         prefix_projection=projection, encoder_hidden_size=24 if projection else None).train()
    batch = T.labels_for(family, batch_for(family))
    step(model, lambda: model(**batch).loss)
    model.eval()
    batch = batch_for(family)
    got = T.output(model, batch)
    pypeft.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        want = peft_logits(pm, batch)
    torch.testing.assert_close(real(family, batch, got), real(family, batch, want), rtol=1e-5, atol=1e-5)


def greedy_with_peft_forward(pm, batch: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards of peft's model (no cache), positions
    from the attention mask as generate makes them (peft adds n)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = pm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generate_equals_peft_forward_decoding(family, padding, tmp_path):
    base, pm = trained_with_peft(family, projection=False)
    batch = T.inputs(family)
    batch["attention_mask"] = batch["attention_mask"].flip(-1) if padding == "left" else \
        torch.ones_like(batch["attention_mask"])
    want = greedy_with_peft_forward(pm, batch, steps=6)
    pm.save_pretrained(tmp_path)
    model = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    got = model.generate(**batch, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(got, want)


def test_t5_greedy_generate_equals_peft_forward_decoding(tmp_path):
    base, pm = trained_with_peft("t5", projection=False)
    batch = T.inputs("t5")
    del batch["decoder_input_ids"]
    decoded = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(5):
        with torch.no_grad():
            logits = pm(**batch, decoder_input_ids=decoded).logits[:, -1]
        decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], 1)
    pm.save_pretrained(tmp_path)
    model = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    got = model.generate(**batch, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(got, decoded)


def test_saved_config_has_peft_fields(tmp_path):
    import json

    model = pypeft.patch(T.make("llama"), method="prefix_tuning", num_virtual_tokens=4, prefix_projection=True,
                         encoder_hidden_size=24)
    pypeft.save_adapter(model, tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft_model(T.make("llama"), "llama", projection=True)
    expected = pm.peft_config["default"]
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                "num_transformer_submodules", "prefix_projection"):
        assert fields[key] == (getattr(expected, key) if key != "num_virtual_tokens" else 4), key
    assert fields["peft_type"] == "PREFIX_TUNING" and fields["task_type"] == "CAUSAL_LM"
    assert fields["encoder_hidden_size"] == 24


def test_t5_with_three_layers_reads_peft_s_blocks(tmp_path):
    """With 3 layers peft's layout gives decoder layers 0, 1, 2 the blocks 0,
    2, 1 (two layers cannot tell that from "always block 0")."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=T.VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = transformers.T5ForConditionalGeneration(cfg).eval()
    pm = peft_model(base, "t5", projection=False).eval()
    batch = T.inputs("t5")
    with torch.no_grad():
        want = pm(**batch).logits
    pm.save_pretrained(tmp_path)
    model = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(T.output(model, batch), want, rtol=1e-5, atol=1e-5)
    from pypeft.methods.prefix.sites import SITE_ATTR

    blocks = {name: m.__dict__[SITE_ATTR].block for name, m in model.named_modules() if SITE_ATTR in m.__dict__}
    assert {n: b for n, b in blocks.items() if b is not None} == {
        "decoder.block.0.layer.0.SelfAttention": 0, "decoder.block.1.layer.0.SelfAttention": 2,
        "decoder.block.2.layer.0.SelfAttention": 1}
    assert len(blocks) == 9  # encoder self-, decoder self- and cross-attention: all delegate, three prefixed
